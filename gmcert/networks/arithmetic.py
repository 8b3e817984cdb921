"""The arithmetic modes gmcert runs torch in, for the networks and for the bounds on them.

``standard_arithmetic``: the certified pass's (products obey the textbook rounding model);
``layout_free_arithmetic``: the standard DEQ's (that, and deterministic algorithms, so that a
sample's answer does not depend on the batch it shares).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from gmcert.errors import DataError


@contextlib.contextmanager
def standard_arithmetic():
    """No TF32, cuDNN, oneDNN or NNPACK (FFT / Winograd kernels): products obey the standard error model."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(), torch.backends.mkldnn.enabled)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.mkldnn.enabled = False
        _set_matmul_precision("highest")
        with torch.backends.cudnn.flags(enabled=False, allow_tf32=False), torch.backends.nnpack.flags(enabled=False), \
                torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, precision, torch.backends.mkldnn.enabled = saved
        _set_matmul_precision(precision)


def _set_matmul_precision(precision: str) -> None:
    # torch also sets oneDNN's TF32 flag here and warns, on every call, that this build has no Intel
    # GPU support: noise on every certify
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        torch.set_float32_matmul_precision(precision)


#: cuBLAS is deterministic only with one of these workspace settings (torch refuses otherwise)
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


@contextlib.contextmanager
def layout_free_arithmetic(device):
    """The standard DEQ's arithmetic, which both DEQs evaluate in: a sample's answer is one
    function of the sample, whatever batch it shares (:mod:`gmcert.networks.cdeq` has the
    measurement). It is the certified pass's standard arithmetic
    (:func:`standard_arithmetic`) and torch's deterministic algorithms,
    restored on exit. On CUDA it refuses to run unless ``CUBLAS_WORKSPACE_CONFIG`` is set to one
    of ``CUBLAS_DETERMINISTIC`` (cuBLAS reads it when it starts: set it before Python does)."""
    if torch.device(device).type == "cuda" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC:
        raise DataError("a DEQ on CUDA needs deterministic cuBLAS: start Python with "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8")
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with standard_arithmetic():
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])

"""Weights files as state dicts: read (``.pth`` with ``weights_only``, or ``.safetensors``; never
unpickled), mapped onto an architecture by position, and checked against it tensor by tensor."""
from __future__ import annotations

import os

import torch

from gmcert.errors import ModelFileError


def _read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise ModelFileError(path, "missing")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise several types for damaged or foreign files
        raise ModelFileError(path, "corrupt", f"{type(err).__name__}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelFileError(path, "foreign", "not a state dict of tensors")
    return state


def _role(key: str) -> str:
    """The last name component, with BatchNorm buffers kept distinct from weights and biases."""
    return key.rsplit(".", 1)[-1]


def map_ordered(source: dict, target: dict, path: str = "") -> dict:
    """Rename ``source``'s tensors to ``target``'s keys, position by position.

    Raises ModelFileError unless the counts match and, at every position, the shapes and the
    roles (``weight``, ``bias``, ``running_mean``, ...) agree.
    """
    if len(source) != len(target):
        raise ModelFileError(path, "foreign", f"{len(source)} tensors, the architecture has {len(target)}")
    mapped = {}
    for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if tuple(src.shape) != tuple(dst.shape) or _role(src_key) != _role(dst_key):
            raise ModelFileError(path, "foreign", f"tensor {i}: {src_key} {tuple(src.shape)} cannot map "
                                                  f"onto {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def check_state_dict(path, saved: dict, model: torch.nn.Module) -> None:
    """Refuse weights that do not fit ``model``, naming what differs (missing, extra, shapes)."""
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in saved.items()}
    problems = [f"{k} missing" for k in wanted if k not in found]
    problems += [f"{k} not in the model" for k in found if k not in wanted]
    problems += [f"{k} has shape {found[k]}, the model needs {wanted[k]}"
                 for k in wanted if k in found and found[k] != wanted[k]]
    if problems:
        raise ModelFileError(path, "foreign", "weights do not fit the network: " + "; ".join(problems[:4])
                             + ("; ..." if len(problems) > 4 else ""))

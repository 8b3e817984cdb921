"""A contractive DEQ's certified constants, from its stored weights (for verified serialized
smoothing, :mod:`gmcert.smoothing.verified`): the cell's convolution norms and those of their
absolute kernels, which bound each convolution's rounding. Never taken from training."""
from __future__ import annotations

import torch

from gmcert.bounds.convnorm import conv_operator_norm
from gmcert.smoothing.verified import TF32, U32, Contraction

#: relative slack on the float64 norms (their own rounding)
NORM_SLACK = 1.0 + 1e-9


@torch.no_grad()
def certified_norms(cell) -> tuple:
    """``(||W1||, ||W2||, || |W1| ||, || |W2| ||)`` upper bounds in float64 from the weights as used
    by a :class:`gmcert.networks.cdeq.ContractiveCell` (the absolute kernels' norms bound the
    rounding of each convolution)."""
    cell.prepare()
    out = [conv_operator_norm(w, cell.hw, padding=(2, 2)) * NORM_SLACK for w in cell.weights]
    out += [conv_operator_norm(w.abs(), cell.hw, padding=(2, 2)) * NORM_SLACK for w in cell.weights]
    return tuple(out)


def is_contractive(network) -> bool:
    """Whether ``network`` is a contractive DEQ whose constants :func:`contraction_constants` certifies."""
    from gmcert.networks.cdeq import ContractiveDEQ

    return isinstance(network, ContractiveDEQ)


def contraction_constants(deq) -> Contraction:
    """The certified constants verification needs, with the unit roundoff ``deq``'s device computes
    in: TF32's where CUDA allows it (the layout-free arithmetic the DEQ evaluates in does not)."""
    n1, n2, a1, a2 = certified_norms(deq.cell)
    k = deq.pool.kernel_size
    cuda = deq.cell.conv1.weight.device.type == "cuda"
    tf32 = cuda and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    return Contraction(norms=(n1, n2), abs_norms=(a1, a2), dot=deq.cell.conv1.in_channels * 9, tol=deq.tol,
                       window=int(k[0] * k[1]), unit=TF32 if tf32 else U32)

"""Exact operator norms of the linear layers that :mod:`gmcert.bounds.lipschitz` multiplies: dense
matrices (eigenvalues of the smaller Gram matrix) and 2-D convolutions with any stride, dilation,
group count and zero or circular padding (the DFT block spectrum of Sedghi et al. 2019). Every
number is computed in float64 from the weights as given, never by power iteration."""
from __future__ import annotations

import math

import torch

from gmcert.errors import LipschitzUnsupportedError

_SLACK = 1.0 + 1e-8  # relative slack per layer against the float64 rounding of the norm computation


def _matrix_norm(w) -> float:
    """Spectral norm of a float64 matrix from the eigenvalues of its smaller Gram matrix."""
    w = w.contiguous()  # the same bits whatever the stored layout (a baked parametrisation's may be transposed)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def conv_operator_norm(weight, in_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                       circular=False) -> float:
    """Upper bound (exact for the strided circular convolution) on a zero-padded conv's L2 norm.

    ``circular``: torch's circular padding instead. The grid is the input itself: a total padding of
    at most the kernel's extent - 1 keeps every output a distinct row of the strided circular conv
    (a circular shift of it, which leaves the singular values alone), so the bound is exact when the
    output has all H / s_h rows, and an upper bound otherwise. Refused where the stride does not
    divide the input size.

    Parameters
    ----------
    weight : torch.Tensor
        ``(c_out, c_in / groups, kh, kw)``.
    in_hw : (int, int)
        Input height and width.
    padding : (int, int)
        TOTAL zero padding along H and W (any split between the two sides gives the same bound).
    """
    w = weight.detach().to(torch.float64).cpu().contiguous()
    c_out, c_in_g, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    if circular and (in_hw[0] % sh or in_hw[1] % sw or padding[0] > dh * (kh - 1) or padding[1] > dw * (kw - 1)):
        raise LipschitzUnsupportedError(f"no bound for a circular conv with stride {(sh, sw)} and padding "
                                        f"{padding} on a {tuple(in_hw)} input")
    if kh == kw == 1 and groups == 1:  # a selection of positions, then one matrix
        return _matrix_norm(w[:, :, 0, 0]) * _SLACK
    if circular:
        nh, nw = in_hw  # taps wrap around the grid as torch's circular padding does
    else:
        hp, wp = in_hw[0] + padding[0], in_hw[1] + padding[1]
        nh = sh * math.ceil(max(hp, dh * (kh - 1) + 1) / sh)  # grid >= padded input, multiple of the stride
        nw = sw * math.ceil(max(wp, dw * (kw - 1) + 1) / sw)
    mh, mw = nh // sh, nw // sw
    wg = w.reshape(groups, c_out // groups, c_in_g, kh, kw)
    eh = torch.exp(-2j * math.pi * torch.outer(torch.arange(nh), torch.arange(kh) * dh).double() / nh)
    ew = torch.exp(-2j * math.pi * torch.outer(torch.arange(nw), torch.arange(kw) * dw).double() / nw)
    rows = torch.einsum("gocab,fa->fgocb", wg.to(torch.complex128), eh).reshape(sh, mh, groups, c_out // groups,
                                                                               c_in_g, kw)
    per_xi = sh * nw * groups * (c_out // groups) * c_in_g
    chunk, best = max(1, (1 << 22) // per_xi), 0.0
    half = mh // 2 + 1  # a real kernel: the blocks at -xi are the conjugates of those at xi (same spectrum)
    for start in range(0, half, chunk):
        k = torch.einsum("jxgocb,fb->jxfgoc", rows[:, start:min(start + chunk, half)], ew)
        k = k.reshape(sh, k.shape[1], sw, mw, groups, c_out // groups, c_in_g)
        blocks = k.permute(1, 3, 4, 5, 0, 2, 6).reshape(k.shape[1], mw, groups, c_out // groups, -1)
        if blocks.shape[-2] == 1:  # a row vector (depthwise): its norm, without a batched SVD
            top = blocks.abs().square().sum(-1).sqrt().max()
        else:  # the top eigenvalue of the smaller Gram matrix, as _matrix_norm (several times faster than an SVD)
            h = blocks.transpose(-1, -2).conj()
            gram = blocks @ h if blocks.shape[-2] <= blocks.shape[-1] else h @ blocks
            top = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).max().sqrt()
        best = max(best, float(top))
    return best / math.sqrt(sh * sw) * _SLACK

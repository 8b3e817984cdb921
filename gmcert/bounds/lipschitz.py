"""Lipschitz constants of encoders, each with its kind (BRIEF section 4).

``exact``    linear encoders: the spectral norm of the composed matrix; rows orthonormal -> L = 1 and
             the input radius equals the latent radius (kind ``exact``); otherwise kind ``bound``.
``bound``    a SOUND global upper bound: product over layers of true upper bounds on each layer's
             operator norm. Every number is an upper bound by construction, never a power iteration
             (which converges from below):
             * 1x1 conv / linear: exact SVD in float64, BatchNorm folded into the weight;
             * k x k conv (general, grouped, depthwise, strided, dilated): a zero-padded convolution
               on an H x W input equals, on an n x n grid with n >= padded size, an isometric
               zero-embedding, a circular convolution, then output selection and subsampling. So its
               norm is at most that of the strided circular convolution, which is exactly
               ``max_xi sigma_max([K(xi + j m)]_j) / sqrt(s_h s_w)`` (Sedghi et al. 2019, with the
               s_h*s_w stride aliases ``j`` of each output frequency ``xi`` stacked side by side);
               circular padding: the same spectrum on the input's own grid, exact
               (:mod:`gmcert.bounds.convnorm`);
             * pixel-(un)shuffle, zero padding, MaxMin / GroupSort: 1 (permutations and isometric
               embeddings); global L2-norm pooling per channel: 1;
             * BatchNorm alone / input normalisation: max |scale|; ReLU, ReLU6, clamp, max-pool
               over one window: 1; residual block: 1 + L(body); global average pool over N
               positions: 1/sqrt(N); max-pool with overlapping windows: sqrt(windows per pixel);
               L2-norm pooling over windows (``nn.LPPool2d``, p = 2; per window
               ``| ||a|| - ||b|| | <= ||a - b||``): sqrt(windows per pixel), 1 when they do not overlap;
             * resize: ||R_h|| * ||R_w|| of its separable interpolation matrices (bicubic clamp: 1).
             Each layer's number gets a relative slack of 1e-8 against float rounding. Unknown
             modules raise :class:`LipschitzUnsupportedError`; the traversal replays the module on a
             random input and refuses to answer if the replay differs from ``module(x)``.
``estimate`` CLEVER-style (Weng et al. 2018): sampled local Jacobian norms near x, reverse-Weibull
             fit of batch maxima (:mod:`gmcert.bounds.clever`). NOT a certificate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from gmcert.bounds.clever import clever_estimate, jacobian_norms  # noqa: F401  (re-exported: the estimate kind)
from gmcert.data import Resize
from gmcert.bounds.convnorm import _SLACK, _matrix_norm, conv_operator_norm  # noqa: F401  (re-exported)
from gmcert.errors import DataError, LipschitzUnsupportedError  # noqa: F401  (re-exported)

KINDS = ("exact", "bound", "estimate")
_EXACT_MAX_INPUT_DIM = 16384
_ACTIVATIONS = {nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Hardtanh: 1.0, nn.Tanh: 1.0, nn.Softplus: 1.0, nn.Sigmoid: 0.25,
                nn.SiLU: 1.1, nn.GELU: 1.13, nn.Hardswish: 1.5, nn.Hardsigmoid: 1.0 / 6.0, nn.ELU: None,
                nn.LeakyReLU: None}
_NO_OPS = (nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass
class _Op:
    kind: str
    name: str
    module: object = None
    body: list = field(default_factory=list)
    lip: float = 1.0
    in_shape: tuple = ()


def _timm_types() -> dict:
    from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
    from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual
    from timm.models.efficientnet import EfficientNet

    types = (BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d, FastAdaptiveAvgPool, ConvBnAct,
             DepthwiseSeparableConv, EdgeResidual, InvertedResidual, EfficientNet)
    return {t.__name__: t for t in types}


def _ops(m, name):
    """Flatten ``m`` into ops in forward order; exact type matches only (subclasses may differ)."""
    from gmcert.networks.encoder import Encoder
    from gmcert.networks.lipconv import GlobalNormPool, LipschitzConvNet, PadToEven
    from gmcert.networks.projection_layer import ProjectionLayer
    from gmcert.networks.small import GroupSort, LeNet, LipschitzMLP, SmallCNN

    t, tt = type(m), _timm_types()
    if parametrize.is_parametrized(m):  # a student while it trains: its weights as its forward applies them
        t = t.__bases__[0]

    def sub(*names):
        return [o for n in names for o in _ops(getattr(m, n), f"{name}.{n}")]

    if t is Encoder:
        return sub("resize") + [_Op("normalize", f"{name}.normalize", m)] + sub("network")
    if t is nn.Sequential:
        return [o for n, c in m.named_children() for o in _ops(c, f"{name}.{n}")]
    if type(m).__name__ == "DEQNet":
        raise LipschitzUnsupportedError(f"{name} is a deep-equilibrium encoder: no sound bound covers a solve's "
                                        "error; certify it by smoothing (gmcert compare --methods cohen,sequential)")
    if t is SmallCNN:
        return sub("features", "pool", "flatten", "classifier")
    if t is LeNet:
        return sub("features", "flatten", "fc", "classifier")
    if t is LipschitzMLP:
        return sub("flatten", "layers", "classifier")
    if t is LipschitzConvNet:
        return sub("features", "pool", "flatten", "latent", "classifier")
    if t is GroupSort:  # a permutation of each pair: 1-Lipschitz in L2 and exact in floating point
        return [_Op("act", name, m, lip=1.0)]
    if t in (nn.PixelUnshuffle, nn.PixelShuffle, nn.ZeroPad2d, PadToEven):  # permute, embed or crop: exact
        return [_Op("isometry", name, m, lip=1.0)]
    if t is GlobalNormPool:  # per channel | ||a|| - ||b|| | <= ||a - b||
        return [_Op("normpool", name, m, lip=1.0)]
    if t is nn.LPPool2d:  # torch: (N * avg_pool(x^p))^(1/p), which is each window's L2 norm only for p = 2
        if float(m.norm_type) != 2.0 or m.ceil_mode:  # ceil_mode: partial windows are scaled by N anyway
            raise LipschitzUnsupportedError(f"no sound bound for {name}: LPPool2d with norm_type {m.norm_type}"
                                            f"{' and ceil_mode' if m.ceil_mode else ''} (only p = 2, floor mode)")
        return [_Op("l2pool", name, m)]
    if t is tt["EfficientNet"]:
        return sub("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")
    blocks = {tt["ConvBnAct"]: ("conv", "bn1", "aa"),
              tt["EdgeResidual"]: ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2"),
              tt["DepthwiseSeparableConv"]: ("conv_dw", "bn1", "aa", "se", "conv_pw", "bn2"),
              tt["InvertedResidual"]: ("conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3")}
    if t in blocks:  # timm's efficientnet blocks: body in forward order, then "+ shortcut" when has_skip
        if getattr(m, "conv_s2d", None) is not None:
            raise LipschitzUnsupportedError(f"no sound bound for module {name} (space-to-depth); use the estimate kind")
        body = sub(*blocks[t])
        return [_Op("residual", name, m, body)] if m.has_skip else body
    if t is tt["BatchNormAct2d"]:
        return [_Op("bn", name, m)] + sub("drop", "act")
    if t is tt["SelectAdaptivePool2d"]:
        return sub("pool", "flatten")
    if t is tt["FastAdaptiveAvgPool"]:
        return [_Op("global_avg", name, m)] + ([_Op("flatten", name)] if m.flatten else [])
    if t is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1)):
        return [_Op("global_avg", name, m)]
    if t in (nn.Conv2d, tt["Conv2dSame"]):
        if m.padding_mode not in ("zeros", "circular") or (m.padding_mode == "circular" and t is not nn.Conv2d):
            raise LipschitzUnsupportedError(f"no sound bound for {name}: padding_mode {m.padding_mode!r}")
        return [_Op("conv", name, m)]
    simple = {nn.BatchNorm2d: "bn", nn.BatchNorm1d: "bn", nn.Linear: "linear", ProjectionLayer: "linear",
              nn.Flatten: "flatten", nn.MaxPool2d: "maxpool", nn.AvgPool2d: "avgpool", Resize: "resize"}
    if t in simple:
        return [_Op(simple[t], name, m)]
    if t in _ACTIVATIONS:
        lip = _ACTIVATIONS[t] if _ACTIVATIONS[t] is not None else max(1.0, abs(getattr(m, "negative_slope", 0.0)),
                                                                     abs(getattr(m, "alpha", 0.0)))
        return [_Op("act", name, m, lip=lip)]
    if t in _NO_OPS:
        return []
    raise LipschitzUnsupportedError(f"no sound bound for module {name} ({t.__module__}.{t.__name__}); "
                                    "use the estimate kind")


def _replay(ops, x):
    """Run the op list (records each op's input shape); must reproduce ``module(x)``."""
    for op in ops:
        op.in_shape = tuple(x.shape[1:])
        m = op.module
        if op.kind == "residual":
            x = x + _replay(op.body, x)
        elif op.kind == "normalize":
            x = (x - m.mean) / m.std
        elif op.kind == "bn":
            x = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        elif op.kind == "global_avg":
            x = x.mean((2, 3), keepdim=True)
        elif op.kind == "flatten":
            x = x.flatten(1)
        else:
            x = m(x)
    return x


def _bn_scale(bn):
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale * bn.weight.detach().double() if bn.weight is not None else scale


def _conv_padding(conv, h, w):
    """(total pad along H, total pad along W) that the conv's forward applies."""
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    if type(conv) is not nn.Conv2d:  # timm Conv2dSame: TF 'SAME' padding computed from the input size
        return (max((math.ceil(h / sh) - 1) * sh + (kh - 1) * dh + 1 - h, 0),
                max((math.ceil(w / sw) - 1) * sw + (kw - 1) * dw + 1 - w, 0))
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        return dh * (kh - 1), dw * (kw - 1)
    return 2 * conv.padding[0], 2 * conv.padding[1]


def _interp_matrix_norm(n_in, n_out, mode, antialias):
    """Norm of the 1-D interpolation matrix (n_out, n_in). The other axis is a dummy of size 2 kept at
    scale 1 (size 1 takes a different code path in torch's anti-aliased kernels)."""
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1).expand(-1, -1, -1, 2).contiguous()
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": antialias}
    cols = F.interpolate(eye, size=(n_out, 2), mode=mode, **kwargs)[:, 0, :, 0]
    return _matrix_norm(cols)


def _op_bound(op, nxt):
    """(bound, folded the next op) for one op."""
    m, shape = op.module, op.in_shape
    fold = nxt is not None and nxt.kind == "bn"
    if op.kind == "conv":
        w = m.weight.detach().double()
        w = w * _bn_scale(nxt.module).view(-1, 1, 1, 1) if fold else w
        return conv_operator_norm(w, shape[1:], m.stride, _conv_padding(m, *shape[1:]), m.dilation, m.groups,
                                  circular=m.padding_mode == "circular"), fold
    if op.kind == "linear":
        w = m.weight.detach().double()
        w = w * _bn_scale(nxt.module).view(-1, 1) if fold else w
        return _matrix_norm(w) * _SLACK, fold
    if op.kind == "bn":
        return float(_bn_scale(m).abs().max()) * _SLACK, False
    if op.kind == "normalize":
        return float((1.0 / m.std.double()).abs().max()) * _SLACK, False
    if op.kind == "global_avg":
        return 1.0 / math.sqrt(shape[1] * shape[2]) * _SLACK, False
    if op.kind == "maxpool":
        (kh, kw), (sh, sw) = (nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride or m.kernel_size))
        if nn.modules.utils._pair(m.dilation) != (1, 1):
            raise LipschitzUnsupportedError(f"no sound bound for {op.name}: dilated max-pool")
        return math.sqrt(math.ceil(kh / sh) * math.ceil(kw / sw)), False
    if op.kind == "l2pool":  # the windows' norms: sum over windows of ||a_w - b_w||^2 counts a pixel per window
        (kh, kw), (sh, sw) = (nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride or m.kernel_size))
        return math.sqrt(math.ceil(kh / sh) * math.ceil(kw / sw)), False
    if op.kind == "avgpool":
        k, s, p = (nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
        if m.ceil_mode or (not m.count_include_pad and p != (0, 0)) or m.divisor_override:
            raise LipschitzUnsupportedError(f"no sound bound for {op.name}: avg-pool with border-dependent divisor")
        kernel = torch.full((1, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
        return conv_operator_norm(kernel, shape[1:], s, (2 * p[0], 2 * p[1])), False
    if op.kind == "resize":
        (h, w), (oh, ow) = shape[1:], m.size
        if (h, w) == (oh, ow):
            return 1.0, False
        aa = m.interpolation != "nearest" and (oh < h or ow < w)
        return _interp_matrix_norm(h, oh, m.interpolation, aa) * _interp_matrix_norm(w, ow, m.interpolation, aa) \
            * _SLACK, False
    return op.lip, False  # act, flatten


@dataclass
class _Group:
    """A factor of the product bound: an op, the BatchNorm folded into it (or None), its bound ``value``;
    a residual block has its body's groups (value 1 + their product). gmcert.bounds.rounding walks these too."""
    op: _Op
    bn: _Op | None
    value: float
    body: list = field(default_factory=list)


def _groups(ops) -> list:
    groups, i = [], 0
    while i < len(ops):
        if ops[i].kind == "residual":
            body, total = _groups(ops[i].body), 1.0
            for g in body:
                total *= g.value
            groups.append(_Group(ops[i], None, 1.0 + total, body))
            i += 1
            continue
        value, folded = _op_bound(ops[i], ops[i + 1] if i + 1 < len(ops) else None)
        groups.append(_Group(ops[i], ops[i + 1] if folded else None, value))
        i += 2 if folded else 1
    return groups


def _traced_ops(module, input_shape, seed=0):
    stochastic = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    if any(sub.training and (isinstance(sub, stochastic) or type(sub).__name__ == "DropPath")
           for sub in module.modules()):
        raise DataError("put the module in eval mode (BatchNorm and dropout must be fixed maps)")
    ops = _ops(module, type(module).__name__)
    param = next(module.parameters(), None)
    gen = torch.Generator().manual_seed(seed)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.rand((2, *input_shape), generator=gen).to(param.device if param is not None else "cpu", dtype)
    with torch.no_grad():
        want, got = module(x), _replay(ops, x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
        raise LipschitzUnsupportedError(f"{type(module).__name__}: the layer traversal does not reproduce the "
                                        "module's forward pass; no sound bound, use the estimate kind")
    return ops


def layer_bounds(module, input_shape) -> list:
    """[(layer name, upper bound on its Lipschitz constant)] in forward order, for ``(C, H, W)`` inputs."""
    return [(g.op.name + ("+bn" if g.bn is not None else ""), g.value)
            for g in _groups(_traced_ops(module, tuple(input_shape)))]


def spectral_bound(module, input_shape) -> float:
    """Sound global upper bound on the L2 Lipschitz constant of ``module`` on ``(C, H, W)`` inputs."""
    return float(np.prod([v for _, v in layer_bounds(module, input_shape)]))


def linear_lipschitz(module, input_shape) -> tuple:
    """``(L, kind)`` for a linear (affine) module: exact spectral norm of its composed matrix.

    ``kind`` is ``exact`` when the matrix has orthonormal rows (L = 1 up to rounding, which is
    rounded up), ``bound`` otherwise. Inputs of more than 16384 values fall back to the product of
    layer norms (kind ``bound``).
    """
    ops = _traced_ops(module, tuple(input_shape))
    flat = []
    stack = list(ops)
    while stack:
        op = stack.pop()
        stack.extend(op.body)
        flat.append(op)
    for op in flat:
        nonlinear = op.kind in ("act", "maxpool", "normpool", "l2pool") or (
            op.kind == "resize" and op.module.interpolation == "bicubic" and tuple(op.in_shape[1:]) != op.module.size)
        if nonlinear or op.kind == "residual":
            raise DataError(f"the exact kind needs a linear encoder; {op.name} is not linear (use bound)")
    dim = int(np.prod(input_shape))
    if dim > _EXACT_MAX_INPUT_DIM:
        return spectral_bound(module, input_shape), "bound"
    import copy

    double = copy.deepcopy(module).double().eval()
    basis = torch.eye(dim, dtype=torch.float64).view(dim, *input_shape)
    with torch.no_grad():
        offset = double(torch.zeros(1, *input_shape, dtype=torch.float64))
        matrix = torch.cat([double(b) - offset for b in basis.split(1024)]).reshape(dim, -1).T
    gram = matrix @ matrix.T
    top = float(torch.linalg.eigvalsh(gram)[-1])
    if float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max()) <= 1e-10:
        return math.sqrt(max(top, 1.0)), "exact"
    return math.sqrt(top) * _SLACK, "bound"


def lipschitz_constant(module, kind: str = "bound", *, input_shape=None, x=None, **estimate_kwargs) -> tuple:
    """``(L, radius kind)`` of ``module`` (eval mode) for the input-radius kind asked for.

    Parameters
    ----------
    module : torch.nn.Module
        Encoder (optionally composed with a projection in an ``nn.Sequential``).
    kind : {"exact", "bound", "estimate"}
        ``exact`` returns kind ``exact`` or ``bound`` (see :func:`linear_lipschitz`).
    input_shape : (C, H, W)
        Required for ``exact`` and ``bound``.
    x : tensor ``(C, H, W)``
        Required for ``estimate``; further keyword arguments go to :func:`clever_estimate`.
    """
    if kind not in KINDS:
        raise DataError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "estimate":
        if x is None:
            raise DataError("the estimate kind needs the input x")
        return clever_estimate(module, x, **estimate_kwargs), "estimate"
    if input_shape is None:
        raise DataError(f"the {kind} kind needs input_shape (C, H, W)")
    if kind == "exact":
        return linear_lipschitz(module, input_shape)
    return spectral_bound(module, input_shape), "bound"

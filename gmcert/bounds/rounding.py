"""Sound bounds on the floating-point error of an encoder's forward pass (BRIEF sections 3, 4, 10).

A certificate of kind ``exact`` or ``bound`` is a statement about the encoder's exact function f:
real arithmetic on the module's stored parameters. A forward pass computes some z near f(x).
:class:`ForwardErrorBound` runs that pass in float64 and returns, per input, a sound upper bound
``err >= ||z - f(x)||_2``; subtracting ``err`` from the latent radius makes the certificate hold for f.

The argument is running error analysis (Higham 2002, ch. 3). Split the network into the groups whose
Lipschitz bounds L_i :mod:`gmcert.bounds.lipschitz` multiplies (a conv or linear map with its BatchNorm
folded in, an activation, a pool, a resize, a residual block). With y_i exact and y^_i computed,

    ||y^_i - y_i|| <= ||g^_i(y^_{i-1}) - g_i(y^_{i-1})|| + ||g_i(y^_{i-1}) - g_i(y_{i-1})||
                   <= delta_i(y^_{i-1}) + L_i e_{i-1} =: e_i,

delta_i being the local rounding error at the input the group actually got. It is bounded
componentwise from the standard model |fl(a op b) - a op b| <= u |a op b| (u the unit roundoff,
2^-53 in float64, gamma_n = n u / (1 - n u)) and then taken in L2 norm per sample; e_0 = ||x - fl(x)||:

* conv / linear with fan-in k: |fl(Wx + b) - (Wx + b)| <= gamma_{k+1} (|W||x| + |b|) in any summation
  order, with or without FMA or blocking; evaluated as the same conv with |W| on |x|. FFT and Winograd
  convolutions and TF32 break it, so the pass runs with TF32, cuDNN, oneDNN and NNPACK off
  (:func:`standard_arithmetic`): im2col + BLAS or direct loops. A following BatchNorm is folded in by
  the pass itself (W s and (b - mu) s + beta with s = w / sqrt(v + eps), computed in float64 and
  rounded once, within gamma_8 of exact): gamma_{k+12} (|W s||x| + |b s| + |mu s| + |beta|);
* BatchNorm alone, in whatever order torch evaluates it: gamma_16 (|x||s| + |mu s| + |beta|);
  normalisation (x - m) / s: gamma_2 (|x| + |m|) / s; the projection (x - m) W^T: gamma_{k+2} |W|(|x| + |m|);
* average pools over N values: gamma_{N+2} avg(|x|); max-pool, ReLU, ReLU6, clamps, flatten, MaxMin,
  pixel-(un)shuffle, zero padding: exact; L2-norm pooling over N positions (sqrt of a sum of
  squares, |y^ - y| <= gamma_{N+1} y): gamma_{2N+4} |y^|, and sqrt((N + 4) tiny) for squares that underflow;
  ``nn.LPPool2d`` with p = 2 over windows of N pixels (sqrt(N * avg of N squares): N + 3 roundings of a sum
  of nonnegative terms, then the root, allowed 64 u as a libm call): gamma_{2N+136} |y^|, and
  sqrt((2N + 4) tiny) for underflow (the division by N and the product by N each lose at most N tiny);
  sigmoid, tanh, softplus, SiLU (libm): 64 u |y|, i.e. 32 ulps where PyTorch's kernels are within a
  few; GELU, hardswish, hardsigmoid, ELU (cancellation in 1 + erf and the like): 64 u (|y| + |x| + 1);
* resize: f uses the exact interpolation weights w (:func:`exact_interpolation_weights`, torch's
  formulas in rational arithmetic). The pass applies them itself, rounded (|w^ - w| <= 2u|w|), tap by
  tap along H then W: |fl(W^_h x W^_w^T) - W_h x W_w^T| <= ((1 + a_h) a_w + a_h) |W_h||x||W_w|^T with
  a = gamma_t (1 + 2u) + 2u for t taps. The bicubic clamp is exact and 1-Lipschitz. Nearest neighbour
  only copies pixels (torch's choice of pixel is part of f);
* residual x + body(x): e_out <= e_in + e_body + gamma_1 ||out^||, e_body the body's running error
  started from e_in (whence the Lipschitz rule 1 + L(body));
* underflow: each group also gets (k + 4) (smallest subnormal) per output value.

Bound terms are evaluated in float64 from nonnegative terms (fewer than 10^9 per sum), and every e_i
is inflated by 1 + 1e-6, more than their own rounding. The unit roundoff follows the pass's dtype, so
the same code bounds a float32 pass (u = 2^-24): the tests check that against float64. The output
differs from ``module.double()(x)`` only in rounding (folded BatchNorm, the resize, and depthwise
convs, which on CPU run tap by tap: PyTorch's float64 CPU kernel for them is many times slower).
For deep encoders without norm-bounded layers err is as vacuous as L (about 1e28 for the pretrained
EfficientNet-Lite0 card, L ~ 1e40); it is small where L is (BRIEF section 10).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmcert.errors import DataError
from gmcert.networks.arithmetic import standard_arithmetic  # noqa: F401  (re-exported)
from gmcert.bounds.interpolation import _interpolate, exact_interpolation_weights  # noqa: F401  (re-exported)
from gmcert.bounds.lipschitz import LipschitzUnsupportedError, _bn_scale, _groups, _traced_ops
from gmcert.networks.projection_layer import ProjectionLayer
from gmcert.networks.small import GroupSort

DTYPES = (torch.float64, torch.float32)
_INFLATE = 1.0 + 1e-6
_BN_ROUNDINGS = 16
_CHUNK_BYTES = 4 << 20
_EXACT_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, GroupSort)  # GroupSort only permutes its input
_SMOOTH_ACTS = (nn.Sigmoid, nn.Tanh, nn.Softplus, nn.SiLU)
_TINY64 = torch.finfo(torch.float64).tiny * torch.finfo(torch.float64).eps


def gamma(n: int, u: float) -> float:
    """``n u / (1 - n u)``: relative error bound of an n-term sum of products at unit roundoff u."""
    if n * u >= 0.5:
        raise DataError(f"a sum of {n} terms is too long for a rounding bound at unit roundoff {u:.3g}")
    return n * u / (1.0 - n * u)


class _Step:
    """One group of :func:`gmcert.bounds.lipschitz._groups` with what its local rounding bound needs."""

    def __init__(self, group, u, dtype):
        self.group, self.op, self.L = group, group.op, group.value
        self.kind, m, self.terms, self.u, self.dtype = group.op.kind, group.op.module, {}, u, dtype
        self.body, self.nonnegative_input = _steps(group.body, u, dtype), False
        tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps + _TINY64
        g16, k = gamma(_BN_ROUNDINGS, u), 4
        if self.kind in ("conv", "linear"):  # BatchNorm folded: W s and (b - mu) s + beta, rounded once
            w, bn, projection = m.weight.detach().double(), group.bn and group.bn.module, isinstance(m, ProjectionLayer)
            k, shape = w[0].numel() + (12 if bn else 2), (-1,) + (1,) * (w.ndim - 1)  # bias, subtraction, folding
            b = m.bias.detach().double() if not projection and m.bias is not None else torch.zeros(len(w)).double()
            s = _bn_scale(bn) if bn else torch.ones(len(w), dtype=torch.float64)
            beta = bn.bias.detach().double() if bn and bn.bias is not None else torch.zeros(len(w)).double()
            mu = bn.running_mean.double() if bn else torch.zeros(len(w), dtype=torch.float64)
            folded_bias = b * s + (beta - mu * s) if bn or not projection and m.bias is not None else None
            self.terms = {"folded_weight": (w * s.view(shape)).to(dtype),
                          "folded_bias": folded_bias.to(dtype) if folded_bias is not None else None}
            g, ws = gamma(k, u), w.abs() * s.abs().view(shape)
            extra = ws @ m.mean.double().abs() if projection else 0.0
            self.terms.update(weight=g * ws, bias=g * (b.abs() * s.abs() + (mu * s).abs() + beta.abs() + extra))
        elif self.kind in ("bn", "normalize"):
            if self.kind == "bn":
                s = _bn_scale(m).abs()
                c2, c3 = g16 * s, g16 * ((m.running_mean.double() * s).abs()
                                         + (m.bias.detach().double().abs() if m.bias is not None else 0.0))
            else:
                std, mean = m.std.double().abs().flatten(), m.mean.double().abs().flatten()
                c2, c3 = gamma(2, u) / std, gamma(2, u) * mean / std
            self.terms = {"scale": c2, "offset": c3}
        elif self.kind == "act":  # multiples of u for |y|, |x| and 1
            coef = (0, 0, 0) if type(m) in _EXACT_ACTS else (2, 0, 0) if type(m) is nn.LeakyReLU else \
                (64, 0, 0) if type(m) in _SMOOTH_ACTS else (64, 64, 64 * max(1.0, abs(getattr(m, "alpha", 1.0))))
            self.coef = tuple(c * u for c in coef)
        elif self.kind in ("global_avg", "avgpool"):
            k = (self.op.in_shape[1] * self.op.in_shape[2] if self.kind == "global_avg"
                 else math.prod(nn.modules.utils._pair(m.kernel_size))) + 2
            self.coef = gamma(k, u)
        elif self.kind == "normpool":  # sqrt of an N-term sum of squares: |y^ - y| <= gamma_{N+1} y, y <= y^ / (1 - ..)
            k = self.op.in_shape[1] * self.op.in_shape[2]
            self.coef = gamma(2 * k + 4, u)
            k = 4 + k  # underflowed squares add at most N tiny to the sum, sqrt(N tiny) to y: see self.floor
        elif self.kind == "l2pool":  # (N * avg(x^2))^(1/2): gamma_{N+3} on the sum, 64 u for pow, y <= y^ / (1 - ..)
            k = math.prod(nn.modules.utils._pair(m.kernel_size))
            self.coef = gamma(2 * (k + 3 + 65), u)
            k = 4 + 2 * k
        elif self.kind == "resize" and tuple(self.op.in_shape[1:]) != m.size and m.interpolation != "nearest":
            shrink, k, alpha = m.size[0] < self.op.in_shape[1] or m.size[1] < self.op.in_shape[2], 0, []
            for dim, n_in, n_out in zip((2, 3), self.op.in_shape[1:], m.size):
                rows = exact_interpolation_weights(n_in, n_out, m.interpolation, shrink)
                taps = max(len(row) for row in rows)
                idx, w = torch.zeros(n_out, taps, dtype=torch.long), torch.zeros(n_out, taps, dtype=torch.float64)
                for i, row in enumerate(rows):
                    for c, (j, v) in enumerate(sorted(row.items())):
                        idx[i, c], w[i, c] = j, float(v)  # correctly rounded; in float32 within 2u of v
                if n_in != n_out or not bool((w[:, 0] == 1).all()):
                    self.terms.update({f"idx{dim}": idx, f"w{dim}": w.to(dtype), f"abs{dim}": w.abs()})
                    alpha.append(gamma(taps, u) * (1 + 2 * u) + 2 * u)
                    k += taps
            alpha += [0.0] * (2 - len(alpha))
            self.coef = (1 + alpha[0]) * alpha[1] + alpha[0]
        self.floor = k * tiny if self.kind not in ("normpool", "l2pool") else math.sqrt(k * tiny) + tiny

    def to(self, device):
        self.terms = {k: v.to(device) if v is not None else None for k, v in self.terms.items()}
        for step in self.body:
            step.to(device)

    def __call__(self, x, e):
        """(computed output, bound on its distance to the exact output) from input x with error bound e."""
        m, kind, t = self.op.module, self.kind, self.terms
        if kind == "residual":
            y, e_body = _run(self.body, x, e)
            out = x + y
            return out, (e + e_body + gamma(1, self.u) * _norm(out)) * _INFLATE
        delta = None
        if kind in ("conv", "linear"):
            a = (x if self.nonnegative_input else x.abs()).double()
            if kind == "conv":
                y, delta = _conv(m, x, t["folded_weight"], t["folded_bias"]), _conv(m, a, t["weight"], t["bias"])
            else:
                projection = isinstance(m, ProjectionLayer)
                y = F.linear(x.flatten(1) - m.mean if projection else x, t["folded_weight"], t["folded_bias"])
                delta = F.linear(a.flatten(1) if projection else a, t["weight"], t["bias"])
        elif kind in ("bn", "normalize"):
            y = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps) \
                if kind == "bn" else (x - m.mean) / m.std
            shape = (1, -1) + (1,) * (x.ndim - 2)
            delta = torch.addcmul(t["offset"].view(shape), x.abs().double(), t["scale"].view(shape))
        elif kind == "act":
            y = m(x)
            c_out, c_in, c_abs = self.coef
            if c_out > 0:
                delta = c_out * y.abs().double() + (c_in * x.abs().double() + c_abs if c_in > 0 else 0.0)
        elif kind == "global_avg":
            y = x.mean((2, 3), keepdim=True)
            delta = self.coef * x.abs().double().mean((2, 3))
        elif kind == "avgpool":
            y = m(x)
            delta = self.coef * m(x.abs().double())
        elif kind == "flatten":
            y = x.flatten(1)
        elif kind in ("normpool", "l2pool"):
            y = m(x)
            delta = self.coef * y.abs().double()
        elif kind == "resize" and t:  # our own taps: torch's float64 weights are themselves rounded
            y = _interpolate(x, t, "w")
            y = y.clamp(0.0, 1.0) if m.interpolation == "bicubic" else y
            delta = self.coef * _interpolate(x.abs().double(), t, "abs")
        else:  # max-pool; a resize that only copies pixels
            y = m(x)
        e, self.last_delta = self.L * e, None  # last_delta: the local term, for gmcert.bounds.ball_rounding
        if delta is not None:
            self.last_delta = _norm(delta) + self.floor * math.sqrt(y[0].numel())
            e = e + self.last_delta
        return y, e * _INFLATE


def _conv(conv, x, weight, bias):
    """``conv``'s map with other parameters. Depthwise on CPU: tap by tap (fused multiply-adds), an order
    the standard bound allows, many times faster than PyTorch's float64 CPU kernel."""
    from timm.layers.conv2d_same import conv2d_same, pad_same

    same = type(conv) is not nn.Conv2d  # timm Conv2dSame: TF 'SAME' padding from the input size only
    if not (conv.groups == conv.in_channels == conv.out_channels and x.device.type == "cpu"
            and conv.padding_mode == "zeros"):
        return conv2d_same(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups) if same \
            else conv._conv_forward(x, weight, bias)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if same:
        pads = (0, 0, 0, 0)
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    elif isinstance(conv.padding, str):
        th, tw = (dh * (kh - 1), dw * (kw - 1)) if conv.padding == "same" else (0, 0)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        pads = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
    x = F.pad(x, pads)
    oh, ow = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = []
    for chunk in x.split(max(1, _CHUNK_BYTES // (x[0].numel() * x.element_size()))):  # stay in cache
        y = None
        for i in range(kh):
            for j in range(kw):
                tap = chunk[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                w = weight[:, 0, i, j].view(1, -1, 1, 1)
                y = tap * w if y is None else y.addcmul_(tap, w)
        out.append(y if bias is None else y.add_(bias.view(1, -1, 1, 1)))
    return torch.cat(out) if len(out) > 1 else out[0]


def _steps(groups, u, dtype):
    steps = [_Step(g, u, dtype) for g in groups]
    for before, step in zip(steps, steps[1:]):  # after a ReLU, |x| is x: spare a pass
        step.nonnegative_input = before.kind == "act" and type(before.op.module) in (nn.ReLU, nn.ReLU6)
    return steps


def _norm(t):
    return t.double().flatten(1).norm(dim=1)


def _run(steps, x, e):
    for step in steps:
        x, e = step(x, e)
    return x, e


def _exact_copy(module, dtype):
    """A CPU copy in ``dtype``; refuses if that would round any parameter or buffer (f would change).
    Parametrised weights (a student while it trains) are materialised first, in their own dtype: f is
    the map with the weights the module's forward applies, not a float64 re-evaluation of them."""
    from torch.nn.utils import parametrize

    out = copy.deepcopy(module).to("cpu")
    for sub in list(out.modules()):
        if parametrize.is_parametrized(sub):  # not remove_parametrizations: it edits the class, shared with module
            values = {name: getattr(sub, name).detach().clone() for name in sub.parametrizations}
            sub.__class__ = type(sub).__bases__[0]
            del sub._modules["parametrizations"]
            for name, value in values.items():
                setattr(sub, name, nn.Parameter(value, requires_grad=False))
    for name, value in list(out.named_parameters()) + list(out.named_buffers()):
        if value.is_floating_point() and not torch.equal(value.detach().to(dtype).to(value.dtype), value.detach()):
            raise DataError(f"{name} ({value.dtype}) is not exactly representable in {dtype}; "
                            "bound the float64 pass instead")
    return out.to(dtype)


class ForwardErrorBound:
    """Forward pass of ``module`` with a sound bound on its distance to the exact-arithmetic output.

    Parameters
    ----------
    module : torch.nn.Module
        In eval mode; any module :mod:`gmcert.bounds.lipschitz` bounds (encoders, projections, ...). It is
        copied; the caller's module is never converted.
    input_shape : tuple
        Shape of one input: ``(C, H, W)`` pixels before the encoder's resize, or ``(d,)`` for a
        projection alone.
    dtype : torch.float64 or torch.float32, default float64
        Precision of the pass; its unit roundoff (2^-53 or 2^-24) drives the bound. float32 exists to
        check the bound against float64.

    Attributes
    ----------
    lipschitz : float
        Sound Lipschitz bound of the module, equal to :func:`gmcert.bounds.lipschitz.spectral_bound`.
    layers : list of (str, float)
        Per-layer bounds, as :func:`gmcert.bounds.lipschitz.layer_bounds`.
    unit_roundoff : float

    Raises
    ------
    LipschitzUnsupportedError
        A module type without a sound bound.
    """

    def __init__(self, module, input_shape, dtype=torch.float64):
        if dtype not in DTYPES:
            raise DataError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        param = next(module.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")  # where passes run by default
        self.input_shape, self.dtype = tuple(int(s) for s in input_shape), dtype
        self.unit_roundoff = torch.finfo(dtype).eps / 2
        self.module_ = _exact_copy(module, dtype)
        groups = _groups(_traced_ops(self.module_, self.input_shape))
        self.layers = [(g.op.name + ("+bn" if g.bn is not None else ""), g.value) for g in groups]
        self.lipschitz = float(np.prod([value for _, value in self.layers]))
        self._steps, self._location = _steps(groups, self.unit_roundoff, dtype), torch.device("cpu")
        x = torch.rand((2, *self.input_shape), generator=torch.Generator().manual_seed(1)).to(dtype)
        with standard_arithmetic():  # the pass computes the module's own function, up to rounding
            want, got = self.module_(x), _run(self._steps, x, torch.zeros(2, dtype=torch.float64))[0]
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
            raise LipschitzUnsupportedError(f"{type(module).__name__}: the rounding analysis does not reproduce "
                                            "the module's forward pass")

    def prepare(self, X, batch_size, device) -> torch.Tensor:
        """``X`` as a tensor, checked, with the pass moved to ``device`` (default: the module's)."""
        X = torch.as_tensor(X)
        if tuple(X.shape[1:]) != self.input_shape or len(X) == 0:
            raise DataError(f"X must have shape (n >= 1, {', '.join(map(str, self.input_shape))}), "
                            f"got {tuple(X.shape)}")
        if int(batch_size) < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        device = torch.device(device) if device is not None else self.device
        if device != self._location:
            self.module_.to(device)
            for step in self._steps:
                step.to(device)
            self._location = device
        return X

    def __call__(self, X, batch_size: int = 64, device=None) -> tuple:
        """``(Z, err)``: outputs ``(n, d)`` float64 and bounds ``(n,)`` on ``||Z_i - f(X_i)||_2``.

        ``X`` is ``(n, *input_shape)`` (array or tensor); values that ``dtype`` cannot hold count as
        input error. ``batch_size`` inputs go through at a time, on ``device`` (default: the module's).
        Non-finite outputs get ``err = inf``. The same pass with its error over a whole ball:
        :func:`gmcert.bounds.ball_rounding.pass_with_ball`.
        """
        X = self.prepare(X, batch_size, device)
        Z, err = [], []
        with standard_arithmetic():
            for batch in X.split(int(batch_size)):
                batch = batch.to(self._location)
                x = batch.to(self.dtype)
                y, e = _run(self._steps, x, _norm(batch.double() - x.double()) * _INFLATE)
                Z.append(y.flatten(1).double().cpu())
                err.append(e.cpu())
        Z, err = torch.cat(Z).numpy(), torch.cat(err).numpy() * _INFLATE
        err[~(np.isfinite(err) & np.isfinite(Z).all(axis=1))] = np.inf
        return Z, err

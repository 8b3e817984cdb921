"""The rounding error of the certified pass at every input of a ball, not only at its centre.

:class:`gmcert.bounds.rounding.ForwardErrorBound` bounds ``e(x) >= ||y^(x) - f(x)||`` at the
input it is given. A certificate of radius r must also hold for the classifier as it runs at each
``x'`` with ``||x' - x|| <= r``, whose computed latent errs by ``e(x')``. This module bounds
``e(x') <= A + B r`` over the whole ball, from the same pass at x.

Per group i of the pass (Lipschitz bound L_i, local rounding ``delta_i(x)``, the norm of a
nonnegative linear map of the magnitudes it saw, plus constants), with ``rho_i`` a bound on
``||y^_i(x') - y^_i(x)||`` and ``E_i`` one on ``e_i(x')``:

    delta_i(x') <= a_i delta_i(x) + S_i rho_{i-1}      (|  |v'| - |v|  | <= |v' - v|, so the map's
                                                          norm S_i bounds the change)
    E_i   <= L_i E_{i-1} + delta_i(x')
    rho_i <= L_i rho_{i-1} + delta_i(x) + delta_i(x')   (both computed outputs against g_i's exact ones)

``S_i`` for a conv, linear map, average pool or resize is ``sqrt(||M||_1 ||M||_inf)`` of its
nonnegative rounding map M (a sound bound on ``||M||_2``; both norms are the largest row and
column sums, read off M applied to ones and its transpose by autograd: no power iteration);
BatchNorm and normalisation: the largest per-channel coefficient; a global average over N
values: its coefficient over sqrt(N). An activation bounded by ``c_out |y| + c_in |x| + c``
changes by at most ``c_out rho_i + c_in rho_{i-1}``; solving for ``rho_i`` gives its ``a_i`` and
``S_i`` (norm pooling's ``c |y|`` is the case c_in = 0). Steps that round nothing (flatten, padding,
pixel-unshuffle, max-pool, MaxMin) have no local term: a = 1, S = 0. Residual blocks add their two branches as the pass does. Every quantity is affine in r,
carried as (per-input constant, rate); all are nonnegative and inflated like the pass's own terms.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from gmcert.bounds.rounding import _conv, _interpolate, _norm, gamma
from gmcert.errors import LipschitzUnsupportedError
from gmcert.networks.arithmetic import standard_arithmetic

_INFLATE = 1.0 + 1e-6
#: the step kinds whose local rounding term _slope bounds; any other with one is refused
_ROUNDING_KINDS = ("conv", "linear", "bn", "normalize", "act", "normpool", "global_avg", "avgpool", "resize")


def positive_map_norm(fn, in_shape, device="cpu") -> float:
    """``sqrt(||M||_1 ||M||_inf)`` >= ``||M||_2`` of the nonnegative linear map ``fn`` on ``(1, *in_shape)``."""
    a = torch.ones((1, *in_shape), dtype=torch.float64, device=device, requires_grad=True)
    with torch.enable_grad():
        out = fn(a)
        rows = float(out.detach().max()) if out.numel() else 0.0
        out.sum().backward()
    cols = float(a.grad.max())
    return math.sqrt(max(rows, 0.0) * max(cols, 0.0)) * _INFLATE


def _slope(step):
    """``(a_i, S_i)`` of one group (cached on the step: it depends only on its weights and shape)."""
    if hasattr(step, "_ball_slope"):
        return step._ball_slope
    m, kind, t, shape = step.op.module, step.kind, step.terms, step.op.in_shape
    device = next((v.device for v in t.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    a, S = 1.0, 0.0
    if kind == "conv":
        S = positive_map_norm(lambda v: _conv(m, v, t["weight"], None), shape, device)
    elif kind == "linear":
        S = positive_map_norm(lambda v: torch.nn.functional.linear(v.flatten(1), t["weight"]), shape, device)
    elif kind in ("bn", "normalize"):
        S = float(t["scale"].max())
    elif kind == "act":
        c_out, c_in, _ = step.coef
        if c_out > 0:
            a = (1 + c_out) / (1 - c_out)
            S = (c_out * step.L + c_in) / (1 - c_out)
    elif kind == "normpool":  # delta = c |y|: an activation with c_out = c, c_in = 0
        c = step.coef
        a, S = (1 + c) / (1 - c), c * step.L / (1 - c)
    elif kind == "global_avg":
        S = step.coef / math.sqrt(shape[1] * shape[2])
    elif kind == "avgpool":
        S = step.coef * positive_map_norm(lambda v: m(v), shape, device)
    elif kind == "resize" and t:
        S = step.coef * positive_map_norm(lambda v: _interpolate(v, t, "abs"), shape, device)
    step._ball_slope = (a, S * _INFLATE)
    return step._ball_slope


def run_ball(steps, x, e, ball):
    """The pass of ``steps`` from ``(x, e)`` with the ball terms ``ball = (E_c, E_r, rho_c, rho_r)``
    (per-input tensors ``E_c, rho_c``, floats ``E_r, rho_r``). Returns ``(y, e, ball)``."""
    for step in steps:
        Ec, Er, rc, rr = ball
        if step.kind == "residual":
            y_body, e_body, (Bc, Br, bc, br) = run_ball(step.body, x, e, ball)
            out = x + y_body
            g1, size = gamma(1, step.u), torch.linalg.vector_norm(out.double().flatten(1), dim=1)
            e = (e + e_body + g1 * size) * _INFLATE
            # the sum's own rounding at x' is within g1 (||out^|| + its change), its change within
            # both branches' changes plus that rounding at either end
            rc_out, rr_out = (rc + bc + 2 * g1 * size) * (1 + 2 * g1) * _INFLATE, (rr + br) * (1 + 2 * g1) * _INFLATE
            ball = ((Ec + Bc + g1 * (size + rc_out)) * _INFLATE, (Er + Br + g1 * rr_out) * _INFLATE, rc_out, rr_out)
            x = out
            continue
        x, e = step(x, e)
        if step.last_delta is not None and step.kind not in _ROUNDING_KINDS:
            raise LipschitzUnsupportedError(f"{step.op.name}: no ball bound for a {step.kind!r} step's rounding")
        a, S = _slope(step)
        delta = step.last_delta if step.last_delta is not None else torch.zeros_like(e)
        delta_c, delta_r = a * delta + S * rc, S * rr
        ball = ((step.L * Ec + delta_c) * _INFLATE, (step.L * Er + delta_r) * _INFLATE,
                (step.L * rc + delta + delta_c) * _INFLATE, (step.L * rr + delta_r) * _INFLATE)
    return x, e, ball


def pass_with_ball(bound, X, batch_size=64, device=None):
    """The pass of ``bound`` (a :class:`gmcert.bounds.rounding.ForwardErrorBound`) on ``X`` with its
    error over balls: ``(Z, err, A, B, rho_c, rho_r)``. ``Z, err`` are ``bound(X)``'s; at every
    ``x'`` within r of ``X_i`` the same pass errs by at most ``A_i + B r`` and its output moves
    by at most ``rho_c_i + rho_r r``."""
    X = bound.prepare(X, batch_size, device)
    u, device = bound.unit_roundoff, bound._location
    parts, rates = [], (0.0, 0.0)
    for batch in X.split(int(batch_size)):
        batch = batch.to(device)
        x = batch.to(bound.dtype)
        e0 = _norm(batch.double() - x.double()) * _INFLATE
        cast = u * _norm(batch) * _INFLATE  # x' cast to the pass's dtype: within u |x'|
        with standard_arithmetic():
            y, e, (Ec, Er, rc, rr) = run_ball(bound._steps, x, e0, (cast, u, e0 + cast, 1 + u))
        parts.append([t.detach().double().cpu() for t in (y.flatten(1), e, Ec, rc)])
        rates = (Er, rr)
    Z, err, A, rho = (torch.cat([p[i] for p in parts]).numpy() for i in range(4))
    bad = ~(np.isfinite(err) & np.isfinite(A) & np.isfinite(Z).all(axis=1))
    err, A = err * _INFLATE, A * _INFLATE
    err[bad], A[bad] = np.inf, np.inf
    return Z, err, A, float(rates[0]) * _INFLATE, rho, float(rates[1]) * _INFLATE

"""CLEVER-style local Lipschitz estimates (Weng et al. 2018): the ``estimate`` radius kind, NOT a
certificate. Sampled Jacobian norms near x (power iteration, each iterate a lower bound on the local
norm) and a reverse-Weibull fit of their batch maxima."""
from __future__ import annotations

import math

import numpy as np
import torch


def jacobian_norms(module, points, iterations: int = 10, seed: int = 0, step: float = 1e-3) -> np.ndarray:
    """Per-point lower bounds on the Jacobian spectral norm at ``points`` ``(n, ...)``.

    Power iteration on J^T J: ``J v`` by a forward difference (one forward pass), ``J^T u`` by
    autograd. The value returned, ``||J^T u|| / ||u||``, is a LOWER bound on ``||J||`` for any u,
    so finite-difference error only slows convergence. Assumes batch rows are independent (eval mode).
    """
    gen = torch.Generator().manual_seed(seed)
    points = points.detach()
    shape = (-1,) + (1,) * (points.ndim - 1)
    v = torch.randn(points.shape, generator=gen, dtype=points.dtype).to(points.device)
    v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
    out, pullback = torch.func.vjp(module, points)
    out, values = out.detach(), torch.zeros(points.shape[0], dtype=torch.float64)
    for _ in range(max(1, iterations)):
        with torch.no_grad():
            u = module(points + step * v) - out
        grad = pullback(u)[0].detach()
        u_norm, g_norm = u.flatten(1).norm(dim=1), grad.flatten(1).norm(dim=1)
        ratio = torch.where(u_norm > 0, g_norm / u_norm.clamp_min(1e-30), 0.0).double().cpu()
        values = torch.maximum(values, ratio)  # every iterate is a valid lower bound
        v = grad / g_norm.clamp_min(1e-30).view(shape)
    return values.numpy()


def clever_estimate(module, x, radius: float = 0.1, n_batches: int = 10, batch_size: int = 8,
                    iterations: int = 5, seed: int = 0) -> float:
    """CLEVER-style local Lipschitz estimate at ``x`` ``(C, H, W)``: NOT a certificate.

    Samples ``n_batches * batch_size`` points uniformly in the L2 ball of ``radius`` around x
    (clipped to [0, 1]), takes each point's Jacobian norm (power iteration), fits a reverse
    Weibull (``scipy.stats.weibull_max``) to the batch maxima and returns its location (the
    estimated maximum), or the largest observed value if that is larger or the fit fails.
    """
    from scipy.stats import weibull_max

    x = torch.as_tensor(x).float()
    x = x[0] if x.ndim == 4 else x
    gen = torch.Generator().manual_seed(seed)
    dim, maxima = x.numel(), []
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    for b in range(n_batches):
        direction = torch.randn((batch_size, *x.shape), generator=gen)
        direction /= direction.flatten(1).norm(dim=1).view(-1, *[1] * x.ndim)
        scale = radius * torch.rand(batch_size, generator=gen) ** (1.0 / dim)
        points = (x + direction * scale.view(-1, *[1] * x.ndim)).clamp(0.0, 1.0).to(device)
        maxima.append(float(jacobian_norms(module, points, iterations, seed + b).max()))
    maxima = np.asarray(maxima)
    try:
        _, loc, _ = weibull_max.fit(maxima)
    except (ValueError, RuntimeError, FloatingPointError):
        loc = math.nan
    return float(max(loc, maxima.max())) if np.isfinite(loc) else float(maxima.max())

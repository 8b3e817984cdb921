"""Per-pair latent radii of the mixture certificates (BRIEF §3). Pure numpy, float64.

For a winning component ``j`` and a rival ``l`` (see :mod:`gmcert.latent.certificates` for how the
margin ``m``, the vector ``a`` and ``W = P_l - P_j`` arise, and for the shifted margin), the pair
radius is the distance ``r`` from 0 to ``{delta : m - 2 a^T delta + delta^T W delta <= 0}``.
:func:`closed_form_radius` bounds it from ``lambda_min(W)`` alone; :func:`solve_dual` solves its
S-lemma dual in W's eigenbasis; :func:`_optimal_direction` recovers the minimising ``delta``.
Every value returned is a lower bound on the exact-arithmetic radius of its inputs (roundings
taken against us, ``RADIUS_SHAVE`` off the end result); the dual value is only trusted, for the
radius and for the cutoff alike, once every rounding in it has been taken against us. Whether a
value is also *exact* is reported separately (``settled``): near tangency (W > 0, ``m`` within
rounding of ``a^T W^-1 a``) the optimum runs off to ``mu -> inf``, where ``phi`` cancels to
noise; there the value returned is sound but may be far below the radius.
"""
from __future__ import annotations

import numpy as np

EPS = np.finfo(np.float64).eps
RADIUS_SHAVE = 1e-9   # relative margin shaved off every reported radius
DUAL_TOL = 1e-11      # the exact solver stops when its proven duality gap is below this (relative)
SETTLE_TOL = 1e-9     # a converged row is settled if rounding moves its dual value less than this
MAX_ITER = 200


def closed_form_radius(m, a_norm2, lam):
    """Per-pair bound ``r >= m / (||a|| + sqrt(||a||^2 - lam m))``, rounded down.

    Sound because ``delta^T W delta >= lam ||delta||^2`` and ``a^T delta <= ||a|| ||delta||``:
    the expression stays above ``m - 2||a|| t + lam t^2`` at ``||delta|| = t``, whose smallest
    positive root is the formula; with ``lam > 0`` and ``||a||^2 < lam m`` it has no root (inf).

    Parameters
    ----------
    m, a_norm2, lam : ndarray, broadcastable
        Margin (already shaved), ``||a||^2`` and a lower bound on ``lambda_min(W)``.

    Returns
    -------
    ndarray of float64, 0 where ``m <= 0``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        # rounding errors would otherwise enter through the square root amplified
        disc = a_norm2 - lam * m + 1e-12 * (a_norm2 + np.abs(lam * m))
        r = m / (np.sqrt(a_norm2) * (1 + 4 * EPS) + np.sqrt(np.maximum(disc, 0.0)))
        never = ((lam > 0) & (disc < 0)) | ((a_norm2 == 0) & (lam >= 0))
        r = np.where(never, np.inf, r)
    return np.where((m > 0) & ~np.isnan(r), r * (1 - RADIUS_SHAVE), 0.0)  # NaN: certify nothing


def solve_dual(m, b2, lam, tau0=None, cutoff2=None, return_settled=False):
    """Maximise the S-lemma dual ``phi(mu) = mu m - mu^2 sum_i b2_i / (1 + mu lam_i)``, per row.

    ``phi`` is concave on ``[0, 1/max(0, -min lam))`` and, by weak duality, every feasible mu gives
    ``phi(mu) <= r^2``: the value returned is phi at the best iterate, evaluated with rounding
    against us, so the solver only affects tightness. In ``tau = 1/mu``, with
    ``w = sum b2/(tau+lam)`` and ``v = sum b2/(tau+lam)^2``: ``phi = (m - w)/tau`` and
    ``phi' = m - w - tau v``. Newton runs on ``h = (m - w)/v - tau`` (sign of ``phi'``, but no
    pole at ``tau = -lambda_min``: the trust-region trick), steps towards that edge taken in
    ``log(tau - edge)``, inside a bracket with bisection as fallback. A row stops when its
    proven gap (concavity: ``sup phi <= phi + |phi'|`` times the bracket width in mu) is below
    ``DUAL_TOL`` relative, or once ``phi >= cutoff2``. Near tangency the iterates' phi is rounding
    noise (its sign included), so neither the gap nor the cutoff test is trusted as such: phi at
    the best iterate is bounded from below with every rounding against us, a row counts as cut
    only if that bound reaches ``cutoff2``, and as settled only if it converged and rounding cost
    it less than ``SETTLE_TOL``.

    Parameters
    ----------
    m : ndarray (P,)
        Positive (shaved) margins.
    b2, lam : ndarray (P, d)
        Squared coordinates of ``a`` in W's eigenbasis; W's eigenvalues, shifted down by their
        error bound.
    tau0 : ndarray (P,), optional
        Starting ``1/mu``; default: the optimum when every eigenvalue is replaced by their
        ``b2``-weighted mean ``a^T W a / ||a||^2``.
    cutoff2 : ndarray (P,), optional
        Rows whose phi exceeds this stop early (their radius is not the minimum).
    return_settled : bool
        Also return ``settled``.

    Returns
    -------
    tau : ndarray (P,)
        Final ``1/mu`` (0 where the pair is proven never to flip).
    r2 : ndarray (P,)
        Lower bound on the squared radius: inf where proven unbounded, ``>= cutoff2`` where cut
        off, 0 where no iterate gave a positive rounded-down value.
    settled : ndarray (P,) bool, only with ``return_settled``
        ``r2`` is the exact squared radius of these inputs to within ``DUAL_TOL + 2 SETTLE_TOL``
        (relative), or is proven ``>= cutoff2``. False for rows that hit ``MAX_ITER``, were cut on
        a value that did not survive rounding, or lost more than ``SETTLE_TOL`` to rounding.
    """
    P = len(m)
    lmin = lam.min(axis=1)
    edge = np.maximum(-lmin, 0.0)  # tau must exceed both (mu >= 0, 1 + mu lam > 0)
    lo = edge.copy()
    hi = np.full(P, np.inf)
    unbounded = np.zeros(P, bool)
    pos = lmin > 0
    if pos.any():  # W > 0 strictly: the expression's minimum is m - a^T W^-1 a
        # Sound: the quotients and their sum err by (d+1) eps/2 relative at most, far inside the
        # 1e-9, which also covers the rounding of b2 = (Q^T a)^2 upstream; a margin or eigenvalues
        # taken too low (the shaved margin, the shifted eigenvalues) only make the test harder.
        unbounded[pos] = m[pos] > (b2[pos] / lam[pos]).sum(axis=1) * (1 + 1e-9)
    if tau0 is None:  # optimum of the model with every eigenvalue at the b2-weighted mean
        b_norm2 = b2.sum(axis=1)
        l_mean = np.einsum("pd,pd->p", b2, lam) / b_norm2
        t = m / (np.sqrt(b_norm2) + np.sqrt(np.maximum(b_norm2 - l_mean * m, 0.0)))
        tau0 = np.sqrt(b_norm2) / t - l_mean
    with np.errstate(invalid="ignore"):
        tau = np.where(np.isfinite(tau0) & (tau0 > lo), tau0, lo + 0.1 * np.maximum(lo, 1e-3))
    cut = np.full(P, np.inf) if cutoff2 is None else np.asarray(cutoff2) * (1 + 1e-6)
    best_tau, best_phi, best_w = np.full(P, np.inf), np.zeros(P), np.zeros(P)
    converged = np.zeros(P, bool)
    idx = np.flatnonzero(~unbounded)
    work = [b2, lam, m, tau, lo, hi, edge, cut, np.zeros(P, bool)]
    if idx.size < P:
        work = [x[idx] for x in work]
    for _ in range(MAX_ITER):
        if idx.size == 0:
            break
        B2, L, M_, T, LO, HI, EDGE, CUT, DONE = work
        e = T[:, None] + L
        np.reciprocal(e, out=e)
        be = B2 * e
        w = be.sum(axis=1)
        be *= e
        v = be.sum(axis=1)
        y = np.einsum("pd,pd->p", be, e)
        slope = M_ - w - T * v  # phi'(mu)
        with np.errstate(divide="ignore", over="ignore"):  # tau -> 0 near tangency: noise, see below
            phi = np.where(DONE, -np.inf, (M_ - w) / T)  # finished rows keep their best iterate
        better = phi > best_phi[idx]
        best_phi[idx[better]], best_tau[idx[better]], best_w[idx[better]] = phi[better], T[better], w[better]
        rising = slope > 0  # mu below the optimum, so tau above it
        HI = np.where(rising, T, HI)
        LO = np.where(rising, LO, T)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            gap = np.where(rising, slope * (1 / LO - 1 / T), -slope * (1 / T - 1 / HI))
            step = -((M_ - w) / v - T) / (2 * (M_ - w) * y / (v * v))
            # steps towards the domain edge are taken in log(tau - edge), so they never cross it
            dist = T - EDGE
            newton = np.where(step < 0, EDGE + dist * np.exp(step / dist), T + step)
        inside = (newton > LO) & (newton < HI)
        T = np.where(inside, newton, np.where(np.isfinite(HI), 0.5 * (LO + HI), 2 * T + 1.0))
        narrow = np.isfinite(HI) & (HI - LO <= 4 * EPS * HI)
        conv = (gap <= DUAL_TOL * phi) | narrow
        converged[idx[conv & ~DONE]] = True  # finished rows iterate on but no longer count
        DONE = DONE | conv | (phi >= CUT)
        work = [B2, L, M_, T, LO, HI, EDGE, CUT, DONE]
        if DONE.all():
            break
        if DONE.sum() > 0.2 * DONE.size:  # compacting copies, so only once enough have finished
            idx = idx[~DONE]
            work = [x[~DONE] for x in work]
    # phi at the best iterate with every rounding against us. fl(tau + lam) (both exact inputs),
    # its reciprocal, the product with b2 and the sum of d positive terms each err by at most
    # eps/2 relative, so w (1 + 4 (d+2) eps) is above the exact sum; the subtraction, the division
    # and this product lose at most eps/2 each, which (1 - 4 eps) takes back.
    # Rows that never improved (tau = inf) get 0; so do overflows, which only a noise-driven
    # tau -> 0 produces: inf would read as "never flips".
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        r2 = (m - best_w * (1 + 4 * (b2.shape[1] + 2) * EPS)) / best_tau * (1 - 4 * EPS)
    r2 = np.where(unbounded, np.inf, np.where((r2 > 0) & np.isfinite(r2), r2, 0.0))
    best_tau[unbounded] = 0.0
    if not return_settled:
        return best_tau, r2
    # a large rounding loss means the iterates' phi (and so the gap and the bracket) were noise
    settled = unbounded | (converged & (r2 > 0) & (r2 >= best_phi * (1 - SETTLE_TOL)))
    if cutoff2 is not None:
        settled |= r2 >= cutoff2  # proven no closer than the cutoff: not the minimum
    return best_tau, r2, settled


def _unit(v, r):
    """Rows of ``v`` scaled to unit length; zero where ``v`` is 0 or the radius ``r`` is 0 or inf."""
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    ok = (norm[:, 0] > 0) & np.isfinite(r) & (r > 0)
    return np.where(ok[:, None], v / np.where(norm > 0, norm, 1.0), 0.0)


def _optimal_direction(tau, r2, b, lam, bases):
    """Unit minimiser direction ``Q x`` with ``x = b / (tau + l)``, hard case topped up."""
    finite = np.isfinite(r2) & (tau > 0)
    t = np.where(finite, tau, 1.0)[:, None]
    x = np.where(finite[:, None], b / (t + lam), 0.0)
    i0 = lam.argmin(axis=1)
    rows = np.arange(len(tau))
    norm2 = (x * x).sum(axis=1)
    rest = norm2 - x[rows, i0] ** 2
    short = finite & (norm2 < r2 * (1 - 1e-8))
    # hard case: the minimiser reaches the boundary along the lowest eigenvector
    sign = np.where(x[rows, i0] < 0, -1.0, 1.0)
    x[rows[short], i0[short]] = sign[short] * np.sqrt(np.maximum(r2[short] - rest[short], 0.0))
    delta = np.empty_like(x)
    for g, Q in bases:
        delta[g] = x[g] if Q is None else x[g] @ Q.T
    return _unit(delta, np.where(finite, r2, np.inf))

"""Latent L2 certificates of a Gaussian-mixture classifier (BRIEF §3). Pure numpy, float64.

Everything works on *components*: component ``m`` has precision ``P_m``, mean ``mu_m``, log
determinant of its covariance ``logdet_m``, log weight ``log w_m`` (prior times in-class weight)
and score ``s_m(z) = -(z-mu_m)^T P_m (z-mu_m) - logdet_m + 2 log w_m``. A class score is
``S_k = 2 logsumexp_{m in k}(s_m / 2)``; with one component per class ``S_k = s_k``.

For a winning component ``j`` and a rival component ``l`` (margin shift ``h_l``, see below),

    s_j(z+delta) - s_l(z+delta) - h_l = m - 2 a^T delta + delta^T W delta,
    a = P_j (z-mu_j) - P_l (z-mu_l),   W = P_l - P_j,   m = s_j(z) - s_l(z) - h_l,

and ``r_jl`` is the distance from z to the set where this expression is ``<= 0``.

Several components per class (the shifted margin). Take any component ``j`` of the predicted
class c, and ``h_l = 2 log M_k`` for a component l of class k with ``M_k`` components. Because
``max_{l in k} s_l <= S_k <= max_{l in k} s_l + 2 log M_k`` (a sum of M_k terms is at most M_k times
its largest), if ``s_j(z+delta) > s_l(z+delta) + 2 log M_k`` for every component l of every class
k != c, then ``S_c(z+delta) >= s_j(z+delta) > max_l s_l(z+delta) + 2 log M_k >= S_k(z+delta)``, so c
is still the unique argmax. Hence ``min_l r_jl`` is a certified radius for each ``j`` in c, and so
is their maximum over ``j``. With one component per class ``h = 0`` and the radius is exact.

Floating point. Each radius is a lower bound on the exact-arithmetic radius: margins lose an
absolute slack proportional to the magnitudes that formed them, eigenvalues of W are shifted
down by a backward-error bound (``W' = W - tol I`` has a larger flip set), the dual objective is
evaluated with denominators rounded down, and ``RADIUS_SHAVE`` comes off the end result.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

EPS = np.finfo(np.float64).eps
RADIUS_SHAVE = 1e-9   # relative margin shaved off every reported radius
MARGIN_SLACK = 1e-11  # absolute margin slack per unit of score magnitude (covers matmul rounding)
DUAL_TOL = 1e-11      # the exact solver stops when its proven duality gap is below this (relative)
MAX_ITER = 200
METHODS = ("exact", "closed_form")
STRUCTURES = ("full", "tied", "diag")
_BLAS = None  # ThreadpoolController, created on first use (it scans the loaded libraries)


def _single_threaded_blas():
    """Chunks run in parallel threads instead: the pair solver makes thousands of small
    matmuls, on which threaded BLAS spends more time synchronising than computing (and
    stalls badly on a busy machine)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


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


def solve_dual(m, b2, lam, tau0=None, cutoff2=None):
    """Maximise the S-lemma dual ``phi(mu) = mu m - mu^2 sum_i b2_i / (1 + mu lam_i)``, per row.

    ``phi`` is concave on ``[0, 1/max(0, -min lam))`` and, by weak duality, every feasible mu gives
    ``phi(mu) <= r^2``: the value returned is phi at the best iterate, evaluated with rounding
    against us, so the solver only affects tightness. In ``tau = 1/mu``, with
    ``w = sum b2/(tau+lam)`` and ``v = sum b2/(tau+lam)^2``: ``phi = (m - w)/tau`` and
    ``phi' = m - w - tau v``. Newton runs on ``h = (m - w)/v - tau`` (sign of ``phi'``, but no
    pole at ``tau = -lambda_min``: the trust-region trick), steps towards that edge taken in
    ``log(tau - edge)``, inside a bracket with bisection as fallback. A row stops when its
    proven gap (concavity: ``sup phi <= phi + |phi'|`` times the bracket width in mu) is below
    ``DUAL_TOL`` relative, or once ``phi >= cutoff2``.

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
        Rows whose phi exceeds this stop early and report it (their radius is not the minimum).

    Returns
    -------
    tau : ndarray (P,)
        Final ``1/mu`` (0 where the pair is proven never to flip).
    r2 : ndarray (P,)
        Lower bound on the squared radius: inf where proven unbounded, ``cutoff2`` where cut off.
    """
    P = len(m)
    lmin = lam.min(axis=1)
    edge = np.maximum(-lmin, 0.0)  # tau must exceed both (mu >= 0, 1 + mu lam > 0)
    lo = edge.copy()
    hi = np.full(P, np.inf)
    unbounded = np.zeros(P, bool)
    pos = lmin > 0
    if pos.any():  # W > 0 strictly: the expression's minimum is m - a^T W^-1 a
        unbounded[pos] = m[pos] > (b2[pos] / lam[pos]).sum(axis=1) * (1 + 1e-9)
    if tau0 is None:  # optimum of the model with every eigenvalue at the b2-weighted mean
        b_norm2 = b2.sum(axis=1)
        l_mean = np.einsum("pd,pd->p", b2, lam) / b_norm2
        t = m / (np.sqrt(b_norm2) + np.sqrt(np.maximum(b_norm2 - l_mean * m, 0.0)))
        tau0 = np.sqrt(b_norm2) / t - l_mean
    with np.errstate(invalid="ignore"):
        tau = np.where(np.isfinite(tau0) & (tau0 > lo), tau0, lo + 0.1 * np.maximum(lo, 1e-3))
    cut = np.full(P, np.inf) if cutoff2 is None else np.asarray(cutoff2) * (1 + 1e-6)
    best_tau, best_phi = np.full(P, np.inf), np.zeros(P)
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
        phi = np.where(DONE, -np.inf, (M_ - w) / T)  # finished rows keep their best iterate
        better = phi > best_phi[idx]
        best_phi[idx[better]], best_tau[idx[better]] = phi[better], T[better]
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
        DONE = DONE | (gap <= DUAL_TOL * phi) | narrow | (phi >= CUT)
        work = [B2, L, M_, T, LO, HI, EDGE, CUT, DONE]
        if DONE.all():
            break
        if DONE.sum() > 0.2 * DONE.size:  # compacting copies, so only once enough have finished
            idx = idx[~DONE]
            work = [x[~DONE] for x in work]
    # rows stopped by the cutoff report the cutoff itself: phi exceeded it with room for rounding
    was_cut = best_phi >= cut
    r2 = np.where(was_cut, cutoff2 if cutoff2 is not None else 0.0, 0.0)
    rest = np.flatnonzero(~was_cut & ~unbounded)
    r2[rest] = _phi_rounded_down(best_tau[rest], m[rest], b2[rest], lam[rest])
    r2[unbounded] = np.inf
    best_tau[unbounded] = 0.0
    return best_tau, r2


def _phi_rounded_down(tau, m, b2, lam):
    """``phi = (m - sum b2/(tau+lam)) / tau`` with every rounding taken against us."""
    finite = np.isfinite(tau)
    tau = np.where(np.isfinite(tau), tau, 1.0)  # unsolved rows (phi = 0) are masked below
    den = tau[:, None] + lam
    den_low = den - 4 * EPS * (np.abs(tau[:, None]) + np.abs(lam))
    ok = (den_low > 0).all(axis=1) & finite
    with np.errstate(divide="ignore", invalid="ignore"):
        w = (b2 / np.where(den_low > 0, den_low, 1.0)).sum(axis=1) * (1 + 4 * (b2.shape[1] + 2) * EPS)
        phi = (m - w) / tau * (1 - 4 * EPS)
    return np.where(ok & (phi > 0), phi, 0.0)


class MixtureGeometry:
    """Component parameters of a fitted mixture plus lazily cached pairwise quantities.

    Parameters
    ----------
    component_class : ndarray (M,) int
        Class index (0..K-1) of each component.
    log_weights : ndarray (M,)
        ``log(pi_k * w_kj)``.
    means : ndarray (M, d)
    precisions : ndarray (M, d, d)
        Symmetric positive definite.
    log_dets : ndarray (M,)
        ``log det`` of each component's covariance.
    structure : {"full", "tied", "diag"}
        ``tied``: all precisions equal (hyperplane boundaries); ``diag``: all diagonal
        (``spherical`` is ``diag`` here). Only used to take cheaper, exactly equivalent paths.
    """

    def __init__(self, component_class, log_weights, means, precisions, log_dets, structure="full"):
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.component_class = np.asarray(component_class, dtype=np.intp)
        self.log_weights = np.asarray(log_weights, dtype=np.float64)
        self.means = np.asarray(means, dtype=np.float64)
        self.precisions = np.asarray(precisions, dtype=np.float64)
        self.log_dets = np.asarray(log_dets, dtype=np.float64)
        self.structure = structure
        n_comp, d = self.means.shape
        counts = np.bincount(self.component_class)
        self.n_classes = len(counts)
        self.class_components = np.full((self.n_classes, counts.max()), -1, dtype=np.intp)
        for k in range(self.n_classes):
            members = np.flatnonzero(self.component_class == k)
            self.class_components[k, : len(members)] = members
        self.shift = 2.0 * np.log(counts)[self.component_class]
        self.diagonals = np.diagonal(self.precisions, axis1=1, axis2=2).copy()
        # scores are computed around a central point so that G = (z - mu) P loses no precision
        # to cancellation when the latents sit far from the origin
        self.center = self.means.mean(axis=0)
        self.centered_means = self.means - self.center
        self.mean_images = np.einsum("md,mde->me", self.centered_means, self.precisions)
        self.stacked_precisions = self.precisions.transpose(1, 0, 2).reshape(d, n_comp * d)
        p_norm = np.abs(self.diagonals).max(axis=1) if structure == "diag" else np.linalg.norm(
            self.precisions, ord=2, axis=(1, 2))
        self._p_norm = p_norm
        self._slack_const = (np.abs(self.log_dets) + 2 * np.abs(self.log_weights) + 1.0
                             + 2 * p_norm * (self.centered_means ** 2).sum(axis=1))
        self._lam_min = np.full((n_comp, n_comp), np.nan)  # rows filled on demand
        self._eig = {}  # (j, l) -> (eigenvalues shifted down, eigenvectors or None)

    # ----------------------------------------------------------------- scores
    def component_terms(self, Z):
        """Component scores, their rounding slack and ``G_m = (z - mu_m) P_m``.

        All components' ``G`` come from one matrix product ``(Z - center) @ [P_1 ... P_M]``.

        Returns
        -------
        s : ndarray (n, M)
        slack : ndarray (n, M)
            Bound on the absolute rounding error of ``s``, with a wide safety factor.
        G : ndarray (n, M, d)
        """
        Zc = Z - self.center
        n, d = Zc.shape
        n_comp = len(self.means)
        # in-place updates: fresh large temporaries cost page faults comparable to the matmul
        if self.structure == "tied":
            G = np.repeat((Zc @ self.precisions[0])[:, None, :], n_comp, axis=1)
            G -= self.mean_images[None]
        elif self.structure == "diag":
            G = np.repeat(Zc[:, None, :], n_comp, axis=1)
            G -= self.centered_means[None]
            G *= self.diagonals[None]
        else:
            G = (Zc @ self.stacked_precisions).reshape(n, n_comp, d)
            G -= self.mean_images[None]
        # (z-c).G - (mu-c).G: its cancellation error is covered by the ||P|| ||z-c||^2 slack term
        maha = np.einsum("nd,nmd->nm", Zc, G) - np.einsum("md,nmd->nm", self.centered_means, G)
        s = -maha - self.log_dets + 2.0 * self.log_weights
        # errors of G scale with ||P|| (||z-c|| + ||mu-c||); of maha with that times ||z-mu||
        z_norm2 = np.einsum("nd,nd->n", Zc, Zc)
        slack = MARGIN_SLACK * (np.abs(maha) + 2 * self._p_norm * z_norm2[:, None] + self._slack_const)
        return s, slack, G

    def class_scores(self, s):
        """Class scores ``S_k = 2 logsumexp_{m in k}(s_m / 2)`` from component scores (n, M)."""
        if self.class_components.shape[1] == 1:
            return s[:, self.class_components[:, 0]]
        cc = self.class_components
        half = np.where(cc >= 0, s[:, np.maximum(cc, 0)] / 2.0, -np.inf)  # (n, K, Mmax)
        top = half.max(axis=2, keepdims=True)
        return 2.0 * (top[..., 0] + np.log(np.exp(half - top).sum(axis=2)))

    # ---------------------------------------------------------- pair geometry
    def lambda_min_rows(self, winners):
        """Lower bounds on ``lambda_min(P_l - P_j)`` for each winner j and every l: (len, M)."""
        for j in np.unique(winners):
            if np.isnan(self._lam_min[j, 0]):
                self._lam_min[j] = self._lambda_min_row(j)
        return self._lam_min[winners]

    def _lambda_min_row(self, j):
        if self.structure == "tied":
            return np.zeros(len(self.means))
        if self.structure == "diag":
            W = self.diagonals - self.diagonals[j]
            return W.min(axis=1) - 2 * EPS * np.abs(W).max(axis=1)
        ev = np.linalg.eigvalsh(self.precisions - self.precisions[j])
        return ev[:, 0] - self._eig_tol(ev)

    def _eig_tol(self, ev):
        """Backward-error bound of a symmetric eigensolver, ``c d eps ||W||``."""
        return 16 * ev.shape[-1] * EPS * np.abs(ev).max(axis=-1) + 1e-300

    def precompute_pairs(self):
        """Eigen-decompose ``W`` for every ordered pair of components of different classes."""
        with _single_threaded_blas():
            for j in range(len(self.means)):
                for l in np.flatnonzero(self.component_class != self.component_class[j]):
                    self.pair_eig(j, l)
                self.lambda_min_rows(np.array([j]))

    def pair_eig(self, j, l):
        """Eigen-decomposition of ``W = P_l - P_j``, eigenvalues shifted down (cached)."""
        key = (int(j), int(l))
        if key not in self._eig:
            if self.structure == "diag":
                w = self.diagonals[l] - self.diagonals[j]
                self._eig[key] = (w - 2 * EPS * np.abs(w).max() - 1e-300, None)
            else:
                ev, Q = np.linalg.eigh(self.precisions[l] - self.precisions[j])
                self._eig[key] = (ev - self._eig_tol(ev), Q)
        return self._eig[key]


def certify(geometry, Z, method="exact", chunk_size=None, return_direction=False, n_jobs=None):
    """Predicted class index and certified latent L2 radius of each row of Z.

    Parameters
    ----------
    geometry : MixtureGeometry
    Z : ndarray (n, d) float64
        Validated, finite latents.
    method : {"exact", "closed_form"}
        ``exact``: hyperplane radius (tied) or the S-lemma dual per pair, solved only for pairs
        whose closed-form bound is below the best radius found so far; ``closed_form``: the
        per-pair bound of :func:`closed_form_radius`. Both are exact for ``tied``.
    chunk_size : int, optional
        Rows per block (bounds memory at about ``chunk_size * M * d`` floats per temporary).
    return_direction : bool
        Also return, per row, a unit direction ``u`` along which the binding pair flips at the
        radius (``exact``: the minimiser ``delta* = Q diag(mu/(1+mu l)) b``, topped up along the
        lowest eigenvector in the hard case; ``closed_form``: the pair's ``a``). Zero when the
        radius is 0 or inf.
    n_jobs : int, optional
        Threads working on chunks at once (numpy releases the GIL; BLAS is kept to one thread
        meanwhile). Default: the number of CPUs. Results do not depend on it.

    Returns
    -------
    pred : ndarray (n,) int
        Index of the predicted class (argmax of the class scores, as ``predict``).
    radius : ndarray (n,) float64
        Certified radius (``inf`` only when proven that no perturbation changes the class).
    direction : ndarray (n, d), only with ``return_direction``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n, d = Z.shape
    n_comp = len(geometry.means)
    chunk = int(chunk_size or max(64, 2**21 // (n_comp * d)))
    pred = np.empty(n, dtype=np.intp)
    radius = np.empty(n)
    direction = np.zeros((n, d)) if return_direction else None

    def work(start):
        rows = slice(start, start + chunk)
        pred[rows], radius[rows], u = _certify_chunk(geometry, Z[rows], method, return_direction)
        if return_direction:
            direction[rows] = u

    starts = range(0, n, chunk)
    n_jobs = max(1, min(len(starts), n_jobs or os.cpu_count() or 1))
    with _single_threaded_blas():
        if n_jobs == 1:
            for start in starts:
                work(start)
        else:
            with ThreadPoolExecutor(n_jobs) as pool:
                list(pool.map(work, starts))
    return (pred, radius, direction) if return_direction else (pred, radius)


def _certify_chunk(geo, Z, method, want):
    s, slack, G = geo.component_terms(Z)
    pred = geo.class_scores(s).argmax(axis=1)
    n, d = Z.shape
    radius = np.zeros(n)
    direction = np.zeros((n, d)) if want else None
    for slot in range(geo.class_components.shape[1]):  # each component of the predicted class
        winner = geo.class_components[pred, slot]
        idx = np.flatnonzero(winner >= 0)
        if idx.size == 0:
            continue
        whole = idx.size == n
        r, u = _winner_radius(geo, s if whole else s[idx], slack if whole else slack[idx],
                              G if whole else G[idx], winner[idx], pred[idx], method, want)
        better = r > radius[idx]
        radius[idx[better]] = r[better]
        if want:
            direction[idx[better]] = u[better]
    return pred, radius, direction


def _winner_radius(geo, s, slack, G, j, cls, method, want):
    """Radius (n,) for winning components j against every rival component."""
    ar = np.arange(len(j))
    A = G[ar, j][:, None, :] - G  # (n, M, d): a for every rival
    a_norm2 = np.einsum("nmd,nmd->nm", A, A)
    m = s[ar, j][:, None] - s - geo.shift - (slack[ar, j][:, None] + slack)
    rival = geo.component_class[None, :] != cls[:, None]
    lb = np.where(rival, closed_form_radius(m, a_norm2, geo.lambda_min_rows(j)), np.inf)
    if method == "closed_form" or geo.structure == "tied":
        k = lb.argmin(axis=1)
        u = _unit(A[ar, k], lb[ar, k]) if want else None
        return lb[ar, k], u
    return _exact_radius(geo, m, lb, A, j, want)


def _unit(v, r):
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    ok = (norm[:, 0] > 0) & np.isfinite(r) & (r > 0)
    return np.where(ok[:, None], v / np.where(norm > 0, norm, 1.0), 0.0)


def _exact_radius(geo, m, lb, A, j, want):
    """min over rivals of the exact pair radius.

    First the pair with the smallest closed-form bound is solved for every row; then only pairs
    whose bound is below that radius, and each of those stops as soon as its dual value proves
    it cannot go lower (any dual value is a lower bound on its radius).
    """
    n = lb.shape[0]
    ar = np.arange(n)
    first = lb.argmin(axis=1)
    lb1 = lb[ar, first]
    best = np.where(lb1 > 0, np.inf, 0.0)
    best_u = np.zeros((n, A.shape[2])) if want else None
    act = np.flatnonzero(np.isfinite(lb1) & (lb1 > 0))
    if act.size:
        f = first[act]
        r, u = _solve_pairs(geo, m[act, f], A[act, f], j[act], f, want)
        best[act] = np.maximum(r, lb1[act])  # both are sound lower bounds
        if want:
            best_u[act] = u
    cand = lb < best[:, None]
    cand[ar, first] = False
    rows, ls = np.nonzero(cand)
    if rows.size:
        r, u = _solve_pairs(geo, m[rows, ls], A[rows, ls], j[rows], ls, want, cutoff=best[rows])
        r = np.maximum(r, lb[rows, ls])
        order = np.lexsort((r, rows))  # smallest radius of each row first
        top = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
        upd = top[r[top] < best[rows[top]]]
        best[rows[upd]] = r[upd]
        if want:
            best_u[rows[upd]] = u[upd]
    if want:
        best_u[~(np.isfinite(best) & (best > 0))] = 0.0
    return best, best_u


def _solve_pairs(geo, m, a, j, l, want, cutoff=None):
    """Exact radius for problems (rows) of pairs (j, l); one eigenbasis matmul per pair."""
    key = j * len(geo.means) + l
    order = np.argsort(key, kind="stable")  # rows of one pair become one contiguous block
    key, a, m = key[order], a[order], m[order]
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1, len(key)]
    b = np.empty_like(a)
    lam = np.empty_like(a)
    bases = []
    for s, e in zip(starts[:-1], starts[1:]):
        ev, Q = geo.pair_eig(j[order[s]], l[order[s]])
        b[s:e] = a[s:e] if Q is None else a[s:e] @ Q
        lam[s:e] = ev
        bases.append((slice(s, e), Q))
    cutoff2 = None if cutoff is None else (cutoff[order] / (1 - RADIUS_SHAVE)) ** 2
    tau, r2 = solve_dual(m, b * b, lam, cutoff2=cutoff2)
    r = np.empty(len(key))
    r[order] = np.sqrt(r2) * (1 - RADIUS_SHAVE)
    if not want:
        return r, None
    u = np.empty_like(a)
    u[order] = _optimal_direction(tau, r2, b, lam, bases)
    return r, u


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

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
evaluated with every rounding against us, and ``RADIUS_SHAVE`` comes off the end result.

Exactness. ``certify(..., return_exact=True)`` also says, per row, whether the radius is the exact
one (to within the solver tolerance and the shave): the pair that attains the minimum must have
been settled by the dual solver, and the radius must not be sensitive to the rounding slack above.
Near tangency (see :mod:`gmcert.latent.dual`) neither holds, and the radius is a sound lower bound only.

This module holds the geometry and the orchestration (which pairs to solve, for which rows);
the per-pair solvers (closed form, S-lemma dual, minimiser direction) are in :mod:`gmcert.latent.dual`.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

# the per-pair solvers; closed_form_radius and solve_dual are re-exported as part of this module's API
from gmcert.latent.dual import EPS, RADIUS_SHAVE, _optimal_direction, _unit, closed_form_radius, solve_dual

MARGIN_SLACK = 1e-11  # absolute margin slack per unit of score magnitude (covers matmul rounding)
# a radius is labelled exact only if the slacks above (margin, eigenvalue shift) move r^2 by less
# than this (relative); with the solver's own tolerances the radius is then within 1e-8 of exact
EXACT_DRIFT = 1e-8
METHODS = ("exact", "closed_form")
STRUCTURES = ("full", "tied", "diag")
_BLAS = None  # ThreadpoolController, created on first use (it scans the loaded libraries)


def single_threaded_blas():
    """Chunks run in parallel threads instead: the pair solver makes thousands of small
    matmuls, on which threaded BLAS spends more time synchronising than computing (and
    stalls badly on a busy machine)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


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
        with single_threaded_blas():
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


def certify(geometry, Z, method="exact", chunk_size=None, return_direction=False, n_jobs=None,
            return_exact=False):
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
    return_exact : bool
        Also return, per row, whether the radius is exact (see ``exact`` below).

    Returns
    -------
    pred : ndarray (n,) int
        Index of the predicted class (argmax of the class scores, as ``predict``).
    radius : ndarray (n,) float64
        Certified radius (``inf`` only when proven that no perturbation changes the class).
    direction : ndarray (n, d), only with ``return_direction``.
    exact : ndarray (n,) bool, only with ``return_exact``; last when both extras are asked for.
        True where the radius is the exact latent radius to within 1e-8 (relative; the solver
        tolerance, the shave and the slacks' effect): ``exact`` method, one component per class,
        and the pair attaining the minimum was settled by the dual solver and is insensitive to
        the slacks (``EXACT_DRIFT``). A 0 radius from a margin <= 0 and a proven infinite radius
        count as exact. ``closed_form`` and several components per class: False, except ``tied``
        with one component per class, where the hyperplane radius is exact (unless the margin is
        below ``4 / EXACT_DRIFT`` times its rounding slack).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n, d = Z.shape
    n_comp = len(geometry.means)
    chunk = int(chunk_size or max(64, 2**21 // (n_comp * d)))
    pred = np.empty(n, dtype=np.intp)
    radius = np.empty(n)
    direction = np.zeros((n, d)) if return_direction else None
    exact = np.zeros(n, dtype=bool)

    def work(start):
        rows = slice(start, start + chunk)
        pred[rows], radius[rows], u, exact[rows] = _certify_chunk(geometry, Z[rows], method, return_direction)
        if return_direction:
            direction[rows] = u

    starts = range(0, n, chunk)
    n_jobs = max(1, min(len(starts), n_jobs or os.cpu_count() or 1))
    with single_threaded_blas():
        if n_jobs == 1:
            for start in starts:
                work(start)
        else:
            with ThreadPoolExecutor(n_jobs) as pool:
                list(pool.map(work, starts))
    return (pred, radius) + ((direction,) if return_direction else ()) + ((exact,) if return_exact else ())


def _certify_chunk(geo, Z, method, want):
    s, slack, G = geo.component_terms(Z)
    pred = geo.class_scores(s).argmax(axis=1)
    n, d = Z.shape
    radius = np.zeros(n)
    direction = np.zeros((n, d)) if want else None
    exact = np.zeros(n, dtype=bool)
    single = geo.class_components.shape[1] == 1  # else the shifted margin: a bound, never exact
    for slot in range(geo.class_components.shape[1]):  # each component of the predicted class
        winner = geo.class_components[pred, slot]
        idx = np.flatnonzero(winner >= 0)
        if idx.size == 0:
            continue
        whole = idx.size == n
        r, u, ex = _winner_radius(geo, s if whole else s[idx], slack if whole else slack[idx],
                                  G if whole else G[idx], winner[idx], pred[idx], method, want)
        better = r > radius[idx]
        radius[idx[better]] = r[better]
        if want:
            direction[idx[better]] = u[better]
        if single:
            exact[idx] = ex
    return pred, radius, direction, exact


def _winner_radius(geo, s, slack, G, j, cls, method, want):
    """Radius (n,), directions and exactness (n,) for winning components j against every rival."""
    ar = np.arange(len(j))
    A = G[ar, j][:, None, :] - G  # (n, M, d): a for every rival
    a_norm2 = np.einsum("nmd,nmd->nm", A, A)
    m_slack = slack[ar, j][:, None] + slack
    m = s[ar, j][:, None] - s - geo.shift - m_slack
    rival = geo.component_class[None, :] != cls[:, None]
    lb = np.where(rival, closed_form_radius(m, a_norm2, geo.lambda_min_rows(j)), np.inf)
    if method == "closed_form" or geo.structure == "tied":
        k = lb.argmin(axis=1)
        u = _unit(A[ar, k], lb[ar, k]) if want else None
        exact = np.zeros(len(j), dtype=bool)
        if geo.structure == "tied":  # r = m / (2||a||): exact, up to the margin's slack (r2 moves 2 dm/m)
            mk = m[ar, k]
            exact = (mk <= 0) | np.isinf(lb[ar, k]) | (4 * m_slack[ar, k] <= EXACT_DRIFT * mk)
        return lb[ar, k], u, exact
    return _exact_radius(geo, m, m_slack, lb, A, j, want)


def _exact_radius(geo, m, m_slack, lb, A, j, want):
    """min over rivals of the exact pair radius.

    First the pair with the smallest closed-form bound is solved for every row; then only pairs
    whose bound is below that radius, and each of those stops as soon as its dual value proves
    it cannot go lower (any dual value is a lower bound on its radius). A row is exact when the
    pair that ends up attaining its minimum was settled (the maximum of two lower bounds is exact
    when either is); pairs skipped or cut are proven no closer, so they do not matter.
    """
    n = lb.shape[0]
    ar = np.arange(n)
    first = lb.argmin(axis=1)
    lb1 = lb[ar, first]
    best = np.where(lb1 > 0, np.inf, 0.0)
    exact = np.isinf(lb1) | ((lb1 == 0) & (m[ar, first] <= 0))  # proven never / margin <= 0
    best_u = np.zeros((n, A.shape[2])) if want else None
    act = np.flatnonzero(np.isfinite(lb1) & (lb1 > 0))
    if act.size:
        f = first[act]
        r, u, exact[act] = _solve_pairs(geo, m[act, f], m_slack[act, f], A[act, f], j[act], f, want)
        best[act] = np.maximum(r, lb1[act])  # both are sound lower bounds
        if want:
            best_u[act] = u
    cand = lb < best[:, None]
    cand[ar, first] = False
    rows, ls = np.nonzero(cand)
    if rows.size:
        r, u, settled = _solve_pairs(geo, m[rows, ls], m_slack[rows, ls], A[rows, ls], j[rows], ls, want,
                                     cutoff=best[rows])
        r = np.maximum(r, lb[rows, ls])
        order = np.lexsort((r, rows))  # smallest radius of each row first
        top = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
        upd = top[r[top] < best[rows[top]]]
        best[rows[upd]] = r[upd]
        exact[rows[upd]] = settled[upd]
        if want:
            best_u[rows[upd]] = u[upd]
    if want:
        best_u[~(np.isfinite(best) & (best > 0))] = 0.0
    return best, best_u, exact


def _solve_pairs(geo, m, m_slack, a, j, l, want, cutoff=None):
    """Exact radius, direction and settledness for problems (rows) of pairs (j, l), from margins
    ``m`` shaved by ``m_slack``; one eigenbasis matmul per pair."""
    key = j * len(geo.means) + l
    order = np.argsort(key, kind="stable")  # rows of one pair become one contiguous block
    key, a, m, m_slack = key[order], a[order], m[order], m_slack[order]
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1, len(key)]
    b = np.empty_like(a)
    lam = np.empty_like(a)
    lam_err = np.empty(len(key))  # what the shift of W's eigenvalues and the eigensolver can cost
    bases = []
    for s, e in zip(starts[:-1], starts[1:]):
        ev, Q = geo.pair_eig(j[order[s]], l[order[s]])
        b[s:e] = a[s:e] if Q is None else a[s:e] @ Q
        lam[s:e] = ev
        lam_err[s:e] = 2 * geo._eig_tol(ev)
        bases.append((slice(s, e), Q))
    cutoff2 = None if cutoff is None else (cutoff[order] / (1 - RADIUS_SHAVE)) ** 2
    tau, r2, settled = solve_dual(m, b * b, lam, cutoff2=cutoff2, return_settled=True)
    # The solver is exact for the problem it was given, which differs from the exact-arithmetic one
    # by the margin slack (up to 2 m_slack) and the eigenvalue shift (up to twice the shift). r2 moves
    # by (dm + r2 dlam) mu* to first order (envelope theorem, mu* = 1/tau), which blows up as
    # tau -> 0, i.e. near tangency; such a value is sound but not the exact radius.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        drift = (2 * m_slack + r2 * lam_err) / tau
    settled &= np.isinf(r2) | (drift <= EXACT_DRIFT * r2)
    r = np.empty(len(key))
    r[order] = np.sqrt(r2) * (1 - RADIUS_SHAVE)
    if cutoff is not None:  # proven no closer than the cutoff: keep the shave's rounding from undercutting it
        r[order] = np.where(r2 >= cutoff2, np.maximum(r[order], cutoff[order]), r[order])
    ok = np.empty(len(key), dtype=bool)
    ok[order] = settled
    if not want:
        return r, None, ok
    u = np.empty_like(a)
    u[order] = _optimal_direction(tau, r2, b, lam, bases)
    return r, u, ok

"""Verified warm answers for serialized smoothing of a contractive DEQ (math: numpy only).

The standard DEQ (:mod:`gmcert.networks.cdeq`) classifies a noisy image by solving z = F(z, u),
u = stem(x), from a cold start until the computed residual ||F(z) - z|| is at most ``tol``, then
pooling z, projecting it to a latent and taking the Gaussian head's argmax, all in float32. Its
cell is a contraction: ||F(z, u) - F(z', u)|| <= L ||z - z'|| with a certified L < 1. A warm chain
reaches some iterate z_k = fl(F(z_{k-1}, u)) in a few steps. The claim checked here, per sample,
is that the standard DEQ's answer equals the class c of the head's exact scores at z_k. When it
holds, the sample's count is the standard DEQ's own: no audit, no alpha spent, and Cohen's
CERTIFY from the counts is exactly the standard's.

Why a passed check is a proof (exact arithmetic for the bounds; every float32 operation of the
deployed classifier and of the chain carries a rounding term, gamma_n = n u / (1 - n u) with
u = 2^-24, the textbook bound for a length-n dot product in any summation order):

1. Warm side. Let z* be the fixed point for u. With e_F(z) a bound on ||fl(F(z)) - F(z)||,
   ||z_k - z*|| <= e_F + L ||z_{k-1} - z*|| <= e_F + L (r + e_F + e_r) / (1 - L), where r is the
   computed ||z_k - z_{k-1}|| and e_r its rounding, because ||z - z*|| <= ||F(z) - z|| / (1 - L)
   for any z (the triangle inequality and the contraction).
2. Cold side. The standard solve stops at z_c whose computed residual is <= tol, so its true
   residual is <= tol + e_F(z_c) + e_r and ||z_c - z*_c|| <= (tol + e_F + e_r) / (1 - L).
3. The cold solve recomputes u in another batch; its stem output u_c may differ from u by rounding.
   The fixed point is 1/(1 - L)-Lipschitz in u (||F(z, u) - F(z, u')|| <= ||u - u'||), so
   ||z*_c - z*|| <= ||u_c - u|| / (1 - L). The stem (a convolution and a GroupNorm) is not
   analysed term by term: ``STEM_RELATIVE`` bounds ||u_c - u|| / ||u||, an assumption that
   ``tests/test_verified.py`` measures (ulp-level differences across batch sizes, far below it).
4. So z_c lies within rho_z = (1) + (2) + (3) of z_k. Pooling (average over disjoint windows of k
   pixels, norm 1/sqrt(k)) and the projection's rows (norm ||W||) map that into a latent ball of
   radius rho = ||W|| rho_z / sqrt(k) + eps_latent around l, the exact latent of our float32
   pooling of z_k; eps_latent bounds that pooling's rounding and the deployed float32 pooling and
   projection's.
5. Head. A component score s_m(l) = -||(l - mu_m) C_m||^2 + o_m (C_m the stored Cholesky factor
   of its precision P_m = C_m C_m^T). For ||d|| <= rho the score difference of classes c and k
   with one component each moves by at most 2 rho ||P_c(l - mu_c) - P_k(l - mu_k)|| +
   rho^2 max(0, lambda_max(P_c - P_k)) (the exact second-order expansion of two quadratics); with
   several components per class a class score 2 logsumexp(s_m / 2) moves by at most the largest
   of its components' 2 rho ||P_m(l - mu_m)|| + rho^2 lambda_max(P_m). The deployed float32 head
   errs on s_m by at most eps_m = 8 gamma_{d+2} (||C_m||_F^2 (||l - mu_m|| + rho)^2 + |o_m|)
   (a margin of 2 over the sum of the difference, matmul, square and sum bounds), plus 8u|S_k|
   for the log-sum-exp. If the exact margin of c over every k at l exceeds its largest move plus
   both classes' rounding, the deployed argmax at the cold answer's latent is c.

Every quantity above is computed in float64 from the float32 values the deployed classifier uses
(exact in float64), whose own error is far below ``F64_SLACK``, the relative slack added to rho
and taken off the margins.

The rounding terms assume each convolution and matmul errs within the dot-product bound (twice it,
for e_F). ``tests/test_verified.py`` measures the float32 cell against float64 for the kernels
torch picks on the CPU (about 1,000 times inside the bound). On CUDA, where cuDNN may run
convolutions in TF32, :func:`gmcert.smoothing.srs.certify_verified` passes TF32's unit; its FFT
and Winograd algorithms have not been measured against the bound here (no GPU in development).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from gmcert.latent.certificates import single_threaded_blas

U32 = 2.0 ** -24
#: assumption (see 3. above): a stem output recomputed in another batch differs by at most this
#: relative amount (about 170 float32 ulps)
STEM_RELATIVE = 1e-5
#: the verification's own float64 arithmetic, relative
F64_SLACK = 1e-9
#: norms taken in float32 (relative error below gamma_1024, about 6e-5 for one z) are raised by this
NORM_ROUNDING = 1.0 + 1e-3


#: TF32's unit roundoff (10 explicit mantissa bits): CUDA convolutions and matmuls may run in it
TF32 = 2.0 ** -11


def gamma(n: int, unit: float = U32) -> float:
    """gamma_n = n u / (1 - n u), the bound for a length-n dot product in arithmetic of unit u."""
    return n * unit / (1 - n * unit)


@dataclass(frozen=True)
class Contraction:
    """The standard DEQ's certified constants: cell ``F(z, u) = ReLU(W2 ReLU(W1 z) + u)``.

    ``norms``: upper bounds on ||W1||, ||W2||; ``abs_norms``: on || |W1| ||, || |W2| || (for
    rounding); ``dot``: the convolutions' dot-product length (c_in * 9); ``tol``: the standard
    solve's residual tolerance; ``window``: pixels per pooling window; ``unit``: the unit roundoff
    of the deployed classifier's convolutions and matmuls (float32's, or TF32's where CUDA allows it).
    """

    norms: tuple
    abs_norms: tuple
    dot: int
    tol: float
    window: int
    unit: float = U32

    @property
    def lipschitz(self) -> float:
        return float(self.norms[0] * self.norms[1])

    def cell_error(self, z_norm, u_norm):
        """e_F: a bound on ||fl(F(z, u)) - F(z, u)|| for one float32 cell evaluation."""
        (n1, n2), (a1, a2), g = self.norms, self.abs_norms, gamma(self.dot + 2, self.unit)
        return 2 * g * (n2 * a1 + a2 * n1 + n1 * n2) * z_norm + 2 * self.unit * u_norm

    def residual_error(self, dim, a_norm, b_norm):
        """Rounding of a computed ||a - b|| (length-``dim`` float32 vectors: norms never run in TF32)."""
        return 2 * gamma(dim + 2) * (a_norm + b_norm)


@dataclass(frozen=True)
class HeadGeometry:
    """The deployed projection and Gaussian head, in float64 from their float32 buffers."""

    proj_mean: np.ndarray   # (D,)
    proj_weight: np.ndarray  # (d, D)
    means: np.ndarray       # (M, d)
    chol: np.ndarray        # (M, d, d): P_m = C_m C_m^T
    offset: np.ndarray      # (M,)
    component_class: np.ndarray  # (M,)
    n_classes: int

    @classmethod
    def build(cls, proj_mean, proj_weight, means, chol, offset, component_class, n_classes):
        return cls(*(np.asarray(a, dtype=np.float64) for a in (proj_mean, proj_weight, means, chol, offset)),
                   np.asarray(component_class, dtype=np.intp), int(n_classes))

    @property
    def single_component(self) -> bool:
        return len(self.component_class) == self.n_classes and np.array_equal(self.component_class,
                                                                              np.arange(self.n_classes))

    @cached_property
    def precomputed(self) -> dict:
        """Precisions, their top eigenvalues and (one component per class) those of their differences."""
        P = np.einsum("mde,mfe->mdf", self.chol, self.chol)
        pair = None
        if self.single_component:
            pair = np.maximum(np.linalg.eigvalsh(P[:, None] - P[None, :])[..., -1], 0.0)
        return {"P": P, "top": np.linalg.eigvalsh(P)[:, -1], "pair": pair, "chol_fro2": (self.chol ** 2).sum((1, 2)),
                # a ball wider than twice the spread of the means holds other classes' territory in
                # practice: :func:`verify` does not try such rows (skipping a row is always sound)
                "cap": 2 * float(np.max(np.linalg.norm(self.means[:, None] - self.means[None], axis=2))),
                "w_norm": float(np.linalg.norm(self.proj_weight, 2)),
                "w_fro": float(np.linalg.norm(self.proj_weight))}


def verify(residual, previous_norm, current_norm, u_norm, features, dim: int, contraction: Contraction,
           head: HeadGeometry, reach: float = np.inf):
    """``(verified, cls, rho)`` per sample: whether the standard DEQ's answer is proven to be ``cls``,
    the class of the head's exact scores at z_k (module docstring), and the latent ball's radius.
    Rows whose ball is wider than ``reach`` (or than twice the spread of the head's means) are not
    tried (``cls`` -1): skipping a row never proves anything wrong, it only leaves it unproven.

    Per sample, computed in float32 from the chain's values: ``residual`` ||z_k - z_{k-1}|| (its
    rounding is in ``residual_error``), ``previous_norm`` ||z_{k-1}||, ``current_norm`` ||z_k||,
    ``u_norm`` ||u|| (raised by ``NORM_ROUNDING``), and ``features`` ``(N, D)``, z_k average-pooled
    over ``contraction.window`` pixels and flattened as the encoder does (its rounding is counted
    with the deployed pooling's); ``dim``: the entries of one z.
    """
    r = np.asarray(residual, dtype=np.float64)
    # norms computed in float32 (relative error below gamma_dim): raised by far more than that
    z_prev, z_cur, u_norm = (np.asarray(v, dtype=np.float64) * NORM_ROUNDING
                             for v in (previous_norm, current_norm, u_norm))
    features = np.asarray(features, dtype=np.float64)
    n = len(r)
    L = contraction.lipschitz
    if not L < 1:  # no certified contraction: nothing can be proven
        return np.zeros(n, dtype=bool), np.full(n, -1), np.full(n, np.inf)
    e_prev = contraction.cell_error(z_prev, u_norm)
    rho_warm = e_prev + L * (r + e_prev + contraction.residual_error(dim, z_cur, z_prev)) / (1 - L)
    # a cap on ||z_c|| for the cold side's rounding terms: z_c is within rho_warm + (2) + (3) of z_k
    stem = 2 * STEM_RELATIVE * u_norm / (1 - L)
    rough = z_cur + rho_warm + stem + 2 * (contraction.tol + 1.0) / (1 - L)
    e_cold = contraction.cell_error(rough, u_norm) + contraction.residual_error(dim, 2 * rough, rough)
    rho_cold = (contraction.tol + e_cold) / (1 - L)
    rho_z = (rho_warm + rho_cold + stem) * (1 + F64_SLACK)
    rho_z[e_cold > 1.0] = np.inf  # the cap on ||z_c|| above assumed e_cold <= 1: otherwise prove nothing

    geo = head.precomputed
    window, d_feat = contraction.window, features.shape[1]
    pooled_norm = rough / np.sqrt(window)
    # float32 pooling (sum of `window` terms, one division; the deployed one and ours) and the deployed
    # projection (length-D dot)
    eps_latent = 4 * gamma(d_feat + window + 4, contraction.unit) * (geo["w_fro"] + 1) * (
        pooled_norm + np.linalg.norm(head.proj_mean))
    rho = (geo["w_norm"] * rho_z / np.sqrt(window) + eps_latent) * (1 + F64_SLACK)
    verified, cls = np.zeros(n, dtype=bool), np.full(n, -1)
    tried = np.flatnonzero(np.isfinite(rho) & (rho < min(geo["cap"], reach)))
    if len(tried):
        with single_threaded_blas():  # threaded BLAS on these small products stalls torch's threads after
            verified[tried], cls[tried] = _head_check(features[tried], rho[tried], head, geo, contraction.unit)
    return verified, cls, rho


def _head_check(features, rho, head: HeadGeometry, geo: dict, unit: float):
    """Step 5 of the module docstring for latents of ``features`` and latent balls of radius ``rho``.

    With one component per class, each pair (c, k) is first tried with ||g_c|| + ||g_k|| in place
    of ||g_c - g_k|| (g_m = P_m (l - mu_m), and ||g_m|| <= ||C_m|| ||(l - mu_m) C_m||, from the
    scores' own products); only the pairs that this cruder move does not settle get the exact one.
    """
    n = len(features)
    latent = (features - head.proj_mean) @ head.proj_weight.T
    diff = latent[None] - head.means[:, None, :]                      # (M, N, d), batched BLAS below
    whitened = diff @ head.chol                                       # (M, N, d): (l - mu_m) C_m
    squares = (whitened ** 2).sum(-1).T                               # (N, M)
    scores = head.offset - squares
    d = latent.shape[1]
    dist = np.sqrt((diff ** 2).sum(-1)).T
    eps = 8 * gamma(d + 2, unit) * (geo["chol_fro2"] * (dist + rho[:, None]) ** 2 + np.abs(head.offset))
    rows = np.arange(n)
    if head.single_component:
        c = scores.argmax(1)
        margin = scores[rows, c][:, None] - scores
        fixed = eps[rows, c][:, None] + eps + F64_SLACK * (np.abs(scores) + 1) + rho[:, None] ** 2 * geo["pair"][c]
        crude = np.sqrt(geo["top"] * squares)                         # >= ||g_m||
        ok = margin > fixed + 2 * rho[:, None] * (crude[rows, c][:, None] + crude)
        ok[rows, c] = True
        r, k = np.nonzero(~ok)
        if len(r):
            grads = np.zeros((n, len(head.means), d))
            for m in range(len(head.means)):
                need = np.zeros(n, dtype=bool)
                need[r[k == m]] = need[r[c[r] == m]] = True
                if need.any():
                    grads[need, m] = whitened[m, need] @ head.chol[m].T   # P_m (l - mu_m)
            exact = np.sqrt(((grads[r, c[r]] - grads[r, k]) ** 2).sum(-1))
            ok[r, k] = margin[r, k] > fixed[r, k] + 2 * rho[r] * exact
        return ok.all(1), c
    K = head.n_classes
    member = head.component_class[None, :] == np.arange(K)[:, None]  # (K, M)
    half = np.where(member[None], scores[:, None, :] / 2, -np.inf)   # (N, K, M)
    top = half.max(2, keepdims=True)
    class_scores = 2 * (top[..., 0] + np.log(np.exp(half - top).sum(2)))
    grad_norm = np.sqrt(((diff @ geo["P"]) ** 2).sum(-1)).T           # (N, M): ||P_m (l - mu_m)||
    comp_move = 2 * rho[:, None] * grad_norm + rho[:, None] ** 2 * geo["top"][None]
    class_move = np.where(member[None], comp_move[:, None, :], 0.0).max(2)
    class_eps = np.where(member[None], eps[:, None, :], 0.0).max(2) + 8 * unit * np.abs(class_scores)
    c = class_scores.argmax(1)
    margin = class_scores[rows, c][:, None] - class_scores
    need = class_move[rows, c][:, None] + class_move + class_eps[rows, c][:, None] + class_eps \
        + F64_SLACK * (np.abs(class_scores) + 1)
    ok = margin > need
    ok[rows, c] = True
    return ok.all(1), c

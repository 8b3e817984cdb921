"""Differential entropy by the Kozachenko–Leonenko k-nearest-neighbour estimator.

For n points x_i in R^d drawn from a density f, with eps_i the Euclidean distance from x_i to
its k-th nearest neighbour among the *other* n - 1 points,

    h_hat = psi(n) - psi(k) + log V_d + (d / n) * sum_i log eps_i ,
    V_d = pi^(d/2) / Gamma(d/2 + 1)   (volume of the unit ball in R^d),

is asymptotically unbiased for h(f) = -E log f(X) (Kozachenko & Leonenko 1987; Kraskov et al.
2004, eq. 20, who write it with the diameter 2*eps_i and the volume of the ball of diameter 1,
the same thing). Each summand ``psi(n) - psi(k) + log V_d + d log eps_i`` estimates -log f(x_i);
these per-point terms are what the mismatch bootstrap resamples.

The estimator is NOT unbiased in finite samples and its bias grows quickly with d: for d beyond
about 10 it needs astronomically many points. Two things here reduce the bias without changing
what is estimated:

* whitening: h(A x + b) = h(x) + log|det A|, and the estimator is equivariant only under
  rotations, translations and scalings, so the data are whitened by their own covariance first
  and the log-determinant is added back. Round clouds are where kNN estimators do best.
* a reference correction: the same estimator run on samples, of the same size, from a density
  fitted to the data whose log-density is known exactly (one Gaussian, or a Gaussian mixture
  chosen by BIC) measures the estimator's bias on data of that shape; subtracting it removes most
  of the bias when the reference resembles the data (a parametric-bootstrap correction). It is a
  correction, not a guarantee: where the reference misses the data's shape, the bias differs.

Neighbour search uses faiss ``IndexFlatL2`` (exact, brute force; on a GPU when faiss sees one).
faiss returns squared distances in float32, so the candidates' distances are recomputed in
float64 from the coordinates before the logarithm is taken.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.special import digamma, gammaln

from gmcert.errors import DataError

#: Extra neighbour candidates fetched beyond k + 1 (self), so that float32 rounding in faiss's
#: ranking cannot push the true k-th neighbour out of the candidate list.
_EXTRA_CANDIDATES = 8
#: Rows per block when recomputing float64 distances (bounds memory at block * k * d floats).
_BLOCK_ROWS = 4096


def log_unit_ball_volume(d: int) -> float:
    """log V_d, the log volume of the unit Euclidean ball in R^d."""
    return 0.5 * d * math.log(math.pi) - float(gammaln(0.5 * d + 1.0))


def gaussian_entropy(d: int, log_det_cov: float = 0.0) -> float:
    """Differential entropy of N(mu, S) in R^d: (d/2) log(2 pi e) + (1/2) log det S."""
    return 0.5 * d * math.log(2.0 * math.pi * math.e) + 0.5 * log_det_cov


def _flat_l2_index(d: int):
    """Exact L2 index; on GPU 0 when faiss was built with GPU support and sees a device.

    Returns the index and the GPU resources object (which must outlive the index), or None.
    """
    import faiss  # imported here so that importing gmcert does not load faiss

    index = faiss.IndexFlatL2(d)
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    return index, None


def knn_distances(X: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of X to its k-th nearest *other* row, in float64.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        Points; n must exceed k.
    k : int
        Neighbour order, 1 <= k < n.

    Returns
    -------
    ndarray of shape (n,)
        Euclidean distance to the k-th nearest neighbour, self excluded. Exact duplicates of a
        point count as neighbours at distance 0.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    if not 1 <= k < n:
        raise DataError(f"k-NN needs 1 <= k < n points, got k={k}, n={n}")
    # Centring before the float32 cast keeps faiss's rounding error relative to the spread of
    # the data instead of to its offset from the origin.
    X = X - X.mean(axis=0)
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    n_candidates = min(n, k + 1 + _EXTRA_CANDIDATES)
    index, _resources = _flat_l2_index(d)
    index.add(X32)
    _, neighbours = index.search(X32, n_candidates)
    del index, _resources

    out = np.empty(n)
    for start in range(0, n, _BLOCK_ROWS):
        rows = np.arange(start, min(start + _BLOCK_ROWS, n))
        idx = neighbours[rows]
        diff = X[idx] - X[rows, None, :]
        dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        # Exclude self by identity, not by position: with duplicates faiss may list a twin first.
        # A row whose self is missing from the list (many twins) already holds >= k others.
        dist[idx == rows[:, None]] = np.inf
        dist[idx < 0] = np.inf
        out[rows] = np.partition(dist, k - 1, axis=1)[:, k - 1]
    return out


def covariance_rank(X: np.ndarray, rel_tol: float = 1e-10) -> int:
    """Numerical rank of the sample covariance of X (n, d): eigenvalues above rel_tol * largest.

    A class whose latents span fewer than d dimensions (a constant pixel, a dead ReLU unit) has
    differential entropy -inf; a k-NN estimator cannot see that and returns a finite number.
    """
    X = np.asarray(X, dtype=np.float64)
    lam = np.linalg.eigvalsh(np.atleast_2d(np.cov(X, rowvar=False)))
    return int(np.sum(lam > rel_tol * max(float(lam.max()), np.finfo(float).tiny)))


def whitening(X: np.ndarray, rel_floor: float = 1e-12):
    """Map X to W = (X - mean) V diag(lam^-1/2) with the sample covariance V diag(lam) V^T.

    Eigenvalues below ``rel_floor * max(lam)`` are floored there so that a rank-deficient sample
    still maps to finite coordinates; its true entropy is then -inf and the caller must warn.

    Returns
    -------
    W : ndarray of shape (n, d)
    log_det : float
        log det of the (floored) covariance, so that h(X) = h(W) + log_det / 2.
    rank : int
        Number of eigenvalues above the floor.
    """
    mean = X.mean(axis=0)
    cov = np.cov(X, rowvar=False, bias=False).reshape(X.shape[1], X.shape[1])
    lam, V = np.linalg.eigh(cov)
    top = max(float(lam.max()), np.finfo(float).tiny)
    rank = int(np.sum(lam > rel_floor * top))
    lam = np.maximum(lam, rel_floor * top)
    W = ((X - mean) @ V) / np.sqrt(lam)
    return W, float(np.sum(np.log(lam))), rank


def knn_entropy_terms(X: np.ndarray, k: int = 5, whiten: bool = True) -> np.ndarray:
    """Per-point Kozachenko–Leonenko terms, each an estimate of -log f(x_i).

    Parameters
    ----------
    X : ndarray of shape (n, d)
        Finite points.
    k : int, default 5
        Neighbour order.
    whiten : bool, default True
        Whiten by the sample covariance first and add half its log-determinant back
        (see the module docstring).

    Returns
    -------
    ndarray of shape (n,)
        Their mean is the entropy estimate in nats. Exact duplicate rows are estimated once
        (a density has no atoms, so twins carry no information about f) and every copy gets its
        representative's term; a warning says how many there were.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    unique, inverse = np.unique(X, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(unique) < n:
        warnings.warn(
            f"{n - len(unique)} of {n} points are exact duplicates; entropy is estimated on the "
            f"{len(unique)} distinct points (duplicates suggest discrete or clipped latents, for "
            "which a differential entropy is not meaningful)", stacklevel=2)
    if len(unique) <= k:
        raise DataError(f"k-NN entropy needs more than k={k} distinct points, got {len(unique)}")
    log_det = 0.0
    if whiten:
        unique, log_det, _ = whitening(unique)
    eps = knn_distances(unique, k)
    # Distinct float64 rows can still be closer than the smallest normal float in extreme cases.
    eps = np.maximum(eps, np.finfo(float).tiny)
    m = len(unique)
    const = float(digamma(m) - digamma(k)) + log_unit_ball_volume(d) + 0.5 * log_det
    return (const + d * np.log(eps))[inverse]


def knn_entropy(X: np.ndarray, k: int = 5, whiten: bool = True) -> float:
    """Kozachenko–Leonenko entropy estimate in nats (mean of :func:`knn_entropy_terms`)."""
    return float(np.mean(knn_entropy_terms(X, k=k, whiten=whiten)))


def _reference_density(W: np.ndarray, max_components: int, random_state):
    """Gaussian mixture fitted to W with 1..max_components components, chosen by BIC.

    Components are only tried while the parameter count stays below n/2, so a thin class in
    many dimensions always gets the single Gaussian.
    """
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    n, d = W.shape
    per_component = d + d * (d + 1) // 2 + 1
    best, best_bic = None, math.inf
    for m in range(1, max_components + 1):
        if m > 1 and m * per_component > n / 2:
            break
        # EM here runs BLAS on d x d blocks: threaded BLAS only adds synchronisation, and on a
        # busy machine its spinning threads made these fits 20x slower.
        with threadpool_limits(limits=1, user_api="blas"):
            candidate = GaussianMixture(m, covariance_type="full", reg_covar=1e-6,
                                        init_params="k-means++", random_state=random_state).fit(W)
        bic = candidate.bic(W)
        if bic < best_bic:
            best, best_bic = candidate, bic
    return best


def reference_bias_terms(X: np.ndarray, k: int = 5, max_components: int = 4, n_repeats: int = 2,
                         random_state=None) -> np.ndarray:
    """Per-point bias of :func:`knn_entropy_terms` on samples from a density fitted to X.

    A Gaussian mixture G (``max_components=1``: a single Gaussian) is fitted to the whitened X;
    samples of the same size are drawn from G and each term is ``entropy_term_i + log g(w_i)``,
    the estimator's term minus the exact -log density at the same point. Their mean estimates the
    estimator's bias on a density shaped like the data (a parametric-bootstrap bias estimate);
    pairing each term with its own point cancels the sampling noise of -log g, leaving only the
    k-NN noise. With a single Gaussian this corrects the bias near Gaussianity only; the mixture
    also follows multimodal or heavy-tailed (scale-mixture) shapes.

    Returns
    -------
    ndarray of shape (n_repeats * n,)
    """
    rng = np.random.default_rng(random_state)
    W, _, _ = whitening(np.asarray(X, dtype=np.float64))
    n = len(W)
    reference = _reference_density(W, max_components, int(rng.integers(2**31)))
    out = []
    for _ in range(n_repeats):
        reference.random_state = int(rng.integers(2**31))
        sample = reference.sample(n)[0]
        out.append(knn_entropy_terms(sample, k=k, whiten=True) + reference.score_samples(sample))
    return np.concatenate(out)

"""Mardia's multivariate normality tests (no torch)."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import chi2, norm


#: Mardia's skewness costs O(n^2 d); larger classes are subsampled to this many points for it.
MARDIA_MAX_N = 4000


def mardia_test(X: np.ndarray, random_state=None) -> dict:
    """Mardia's multivariate skewness and kurtosis tests of normality for one sample.

    With y_i the points whitened by the maximum-likelihood covariance (on its range, of rank r),
    skewness b1 = n^-2 sum_ij (y_i . y_j)^3 and n b1 / 6 ~ chi2 with r(r+1)(r+2)/6 degrees of
    freedom; kurtosis b2 = n^-1 sum_i |y_i|^4 and z = (b2 - r(r+2)) / sqrt(8 r(r+2) / n) ~ N(0, 1)
    (two-sided p-value) under normality. Skewness uses a random subsample of ``MARDIA_MAX_N``
    points for larger samples (``n_skewness`` says how many).

    Returns
    -------
    dict with keys n, rank, skewness, skewness_statistic, skewness_dof, skewness_p, n_skewness,
    kurtosis, kurtosis_z, kurtosis_p.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    Xc = X - X.mean(axis=0)
    lam, V = np.linalg.eigh(Xc.T @ Xc / n)
    keep = lam > 1e-10 * max(float(lam.max()), np.finfo(float).tiny)
    Y = (Xc @ V[:, keep]) / np.sqrt(lam[keep])
    r = int(keep.sum())
    kurtosis = float(np.mean(np.sum(Y * Y, axis=1) ** 2))
    kurtosis_z = (kurtosis - r * (r + 2)) / math.sqrt(8.0 * r * (r + 2) / n)
    Ys = Y
    if n > MARDIA_MAX_N:
        rng = np.random.default_rng(random_state)
        Ys = Y[rng.choice(n, MARDIA_MAX_N, replace=False)]
    m = len(Ys)
    cube_sum = 0.0
    for start in range(0, m, 1024):  # blocks keep the m x m Gram matrix out of memory
        gram = Ys[start:start + 1024] @ Ys.T
        cube_sum += float(np.sum(gram * gram * gram))  # products: ``** 3`` calls pow, far slower
    skewness = cube_sum / m**2
    dof = r * (r + 1) * (r + 2) / 6.0
    statistic = m * skewness / 6.0
    return {
        "n": n, "rank": r, "skewness": skewness, "skewness_statistic": statistic,
        "skewness_dof": dof, "skewness_p": float(chi2.sf(statistic, dof)), "n_skewness": m,
        "kurtosis": kurtosis, "kurtosis_z": float(kurtosis_z),
        "kurtosis_p": float(2.0 * norm.sf(abs(kurtosis_z))),
    }

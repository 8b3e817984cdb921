"""Serialized randomized smoothing's count correction (math: numpy and scipy only).

Serialized smoothing (Gao et al., NeurIPS 2024) certifies a deep-equilibrium model g by drawing
noisy samples in a chain, each solve warm-started from the previous one's fixed point and cut to a
few solver steps. The warm-started answers w_1..w_n are not draws of the standard classifier
(a full solve from a cold start), whose answers s_1..s_n at the same noise are i.i.d. Bernoulli
draws with P(s_i = c_A) = p_A. Counting w's in place of s's can certify what the standard DEQ does
not, and the warm start makes the w's depend on each other in ways no model captures.

The correction, valid whatever the chain's dependence:

1. Before any sampling, draw a uniformly random subset S of K indices of 1..n, independent of the
   noise (:func:`audit_indices`). The chain never sees S: the audit's cold solves do not feed it.
2. Run the chain; count N_w = #{i : w_i = c_A}. For i in S also solve from a cold start, and count
   X = #{i in S : w_i = c_A, s_i != c_A}.
3. Let D = #{i <= n : w_i = c_A, s_i != c_A}, a function of the noise only. Conditionally on the
   noise, S is still uniform, so X ~ Hypergeometric(n, D, K). Inverting the test of each D,
   D_up = max{D : P(X' <= X | D) > alpha_2} (:func:`hypergeometric_upper`) satisfies
   P(D > D_up | noise) <= alpha_2 for every noise, hence unconditionally: P(X' <= x | D) is
   non-increasing in D, so D > D_up implies P(X' <= X | D) <= alpha_2, an event of probability at
   most alpha_2 under the true D.
4. N_s = #{i : s_i = c_A} >= N_w - D, since every i with w_i = c_A either has s_i = c_A or counts
   in D. So with probability >= 1 - alpha_2, N_s >= N_w - D_up =: N_corr.
5. The s_i are i.i.d. (independent noise, a fixed function), so the Clopper-Pearson lower bound at
   alpha_1 from N_s is below p_A with probability >= 1 - alpha_1; it is non-decreasing in the count,
   so the bound from N_corr <= N_s is lower still. By the union bound, P(p_lower > p_A) <=
   alpha_1 + alpha_2 = alpha, and the radius sigma * Phi^-1(p_lower) certifies the standard DEQ's
   smoothed classifier exactly as Cohen et al.'s CERTIFY does (c_A from separate selection draws).

The public SRS code reuses its check samples in the chain, so there X is not hypergeometric given
the chain; here the audit set is drawn first and the chain is blind to it.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import stats

from gmcert.errors import DataError
from gmcert.smoothing.stats import clopper_pearson_lower


def audit_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct chain indices in 0..n-1, uniformly at random, sorted; draw them before sampling."""
    if not 0 <= int(k) <= int(n):
        raise DataError(f"audit_size must be in [0, n], got {k} for n = {n}")
    return np.sort(rng.choice(int(n), size=int(k), replace=False))


def hypergeometric_upper(disagreements, n: int, k: int, alpha: float) -> np.ndarray:
    """Upper (1 - alpha) confidence bound on D, the chain's number of bad disagreements, from X of
    them among K audited indices out of n: max{D : P(X' <= X | D) > alpha}, X' ~ Hypergeom(n, D, K).

    With K = n the audit is the whole chain and the bound is X itself.
    """
    x = np.atleast_1d(np.asarray(disagreements, dtype=np.int64))
    n, k = int(n), int(k)
    if not 0 < alpha < 1:
        raise DataError(f"alpha must lie in (0, 1), got {alpha}")
    if np.any((x < 0) | (x > k)) or not 0 <= k <= n:
        raise DataError(f"need 0 <= disagreements <= audit_size <= n, got {x.tolist()}, {k}, {n}")
    return np.array([_upper(int(value), n, k, float(alpha)) for value in x], dtype=np.int64)


@functools.lru_cache(maxsize=4096)
def _upper(value: int, n: int, k: int, alpha: float) -> int:
    D = np.arange(value, n + 1)  # D < value is impossible given the observation
    cdf = stats.hypergeom.cdf(value, n, D, k)  # P(X' <= value | D), non-increasing in D
    keep = cdf > alpha
    return int(D[keep].max()) if keep.any() else value


def corrected_count(warm_count, audit_disagreements, n: int, audit_size: int, alpha2: float) -> np.ndarray:
    """N_w - D_up, floored at 0: a count the standard classifier's reaches with probability >= 1 - alpha2."""
    d_up = hypergeometric_upper(audit_disagreements, n, audit_size, alpha2)
    return np.maximum(np.asarray(warm_count, dtype=np.int64) - d_up, 0)


def serialized_lower_bound(warm_count, audit_disagreements, n: int, audit_size: int, alpha: float,
                           alpha_split: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(p_lower, D_up)``: a lower confidence bound at level ``alpha`` on the standard classifier's
    p_A from a warm-started chain of ``n`` counted samples and its audit; ``alpha_split`` of alpha goes
    to the audit (alpha_2), the rest to Clopper-Pearson (alpha_1)."""
    if not 0 < alpha_split < 1:
        raise DataError(f"alpha_split must lie in (0, 1), got {alpha_split}")
    alpha2, alpha1 = alpha * alpha_split, alpha * (1 - alpha_split)
    d_up = hypergeometric_upper(audit_disagreements, n, audit_size, alpha2)
    count = np.maximum(np.asarray(warm_count, dtype=np.int64) - d_up, 0)
    return clopper_pearson_lower(count, n, alpha1), d_up

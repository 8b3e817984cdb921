"""Confidence bounds for a Bernoulli mean: fixed-n, Hoeffding, and anytime-valid sequences.

Small pure functions (numpy/scipy only, vectorised over their array arguments) used by the
randomized smoother and the mismatch module. Every bound is one-sided unless its name says
otherwise, and every lower bound errs downward, every upper bound upward.

Anytime-valid confidence sequences (BRIEF §7). For Bernoulli draws with mean p and any
*predictable* forecasts q_i in (0, 1) (q_i may depend on everything drawn before draw i, never
on draw i itself),

    M_t(p) = prod_i q_i^X_i (1 - q_i)^(1 - X_i)  /  ( p^A_t (1 - p)^(t - A_t) )

is a non-negative martingale with M_0 = 1 under the true p, so by Ville's inequality
P(exists t: M_t(p) >= 1/alpha) <= alpha, and {p : M_t(p) < 1/alpha} is a (1 - alpha) confidence
sequence: valid at every t simultaneously, hence under any data-dependent stopping rule.
The beta-binomial mixture is the case q_i = (a + A_{i-1}) / (a + b + i - 1); its numerator is
B(a + A_t, b + t - A_t) / B(a, b). Because log M_t(p) is convex in p with its minimum (< 0) at
the sample mean, the set is an interval and its ends are found by bisection on each monotone
side; bisection returns the end of the bracket that keeps the bound conservative.
"""
from __future__ import annotations

import numpy as np
from scipy import special, stats

from gmcert.errors import DataError

_BISECTION_STEPS = 64  # halves [0, 1] below float64 resolution


def _check_alpha(alpha, name="alpha"):
    alpha = np.asarray(alpha, dtype=np.float64)
    if not np.all((alpha > 0) & (alpha < 1)):
        raise DataError(f"{name} must lie in (0, 1), got {alpha}")
    return alpha


def _check_counts(successes, trials):
    successes = np.asarray(successes, dtype=np.float64)
    trials = np.asarray(trials, dtype=np.float64)
    if not (np.all(np.isfinite(successes)) and np.all(np.isfinite(trials))):
        raise DataError("successes and trials must be finite")
    if np.any(successes < 0) or np.any(successes > trials):
        raise DataError("successes must satisfy 0 <= successes <= trials")
    return successes, trials


def clopper_pearson_lower(successes, trials, alpha):
    """One-sided Clopper-Pearson lower bound: P(p < bound) <= alpha for a fixed ``trials``.

    Parameters
    ----------
    successes, trials : array_like of int
        Hit counts and numbers of draws (broadcast together).
    alpha : float or array_like
        Error probability in (0, 1).

    Returns
    -------
    ndarray of float64 (0-d for scalar input): ``beta.ppf(alpha, k, n - k + 1)``, 0 when k = 0.
    """
    k, n = _check_counts(successes, trials)
    alpha = _check_alpha(alpha)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
    return np.where(k > 0, bound, 0.0)


def clopper_pearson_upper(successes, trials, alpha):
    """One-sided Clopper-Pearson upper bound ``beta.ppf(1 - alpha, k + 1, n - k)``; 1 when k = n."""
    k, n = _check_counts(successes, trials)
    alpha = _check_alpha(alpha)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.isf(alpha, k + 1, np.maximum(n - k, 1))
    return np.where(k < n, bound, 1.0)


def binomial_test_pvalue(successes, trials, p=0.5):
    """Two-sided exact binomial test p-value of H0: mean = ``p`` (``scipy.stats.binomtest``)."""
    if not (0 <= successes <= trials) or trials < 1:
        raise DataError(f"need 0 <= successes <= trials and trials >= 1, got {successes}, {trials}")
    return float(stats.binomtest(int(successes), int(trials), p, alternative="two-sided").pvalue)


def hoeffding_halfwidth(n, alpha, value_range=1.0, two_sided=True):
    """Half-width of Hoeffding's interval for the mean of ``n`` i.i.d. draws in a range of width
    ``value_range``: ``value_range * sqrt(log(k / alpha) / (2 n))`` with k = 2 if two-sided."""
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 1):
        raise DataError(f"n must be >= 1, got {n}")
    alpha = _check_alpha(alpha)
    return value_range * np.sqrt(np.log((2.0 if two_sided else 1.0) / alpha) / (2.0 * n))


def hoeffding_interval(mean, n, alpha, value_range=(0.0, 1.0)):
    """Two-sided (1 - alpha) Hoeffding interval for a mean of ``n`` draws in ``value_range``.

    Returns
    -------
    (lower, upper) : float64 arrays, clipped to ``value_range``.
    """
    lo_v, hi_v = map(float, value_range)
    if not hi_v > lo_v:
        raise DataError(f"value_range must be (low, high) with high > low, got {value_range}")
    mean = np.asarray(mean, dtype=np.float64)
    width = hoeffding_halfwidth(n, alpha, hi_v - lo_v, two_sided=True)
    return np.clip(mean - width, lo_v, hi_v), np.clip(mean + width, lo_v, hi_v)


def betabinomial_log_martingale(p, successes, trials, a=1.0, b=1.0):
    """log M_t(p) of the beta-binomial mixture martingale (module docstring), float64."""
    k, n = _check_counts(successes, trials)
    p = np.asarray(p, dtype=np.float64)
    log_numerator = special.betaln(a + k, b + n - k) - special.betaln(a, b)
    # xlogy/xlog1py give 0 * log 0 = 0, so p = 0 or 1 is handled when no count opposes it.
    return log_numerator - special.xlogy(k, p) - special.xlog1py(n - k, -p)


def _bisect(log_m, lo, hi, threshold, rejected_at_lo):
    """Bisect a monotone predicate ``log_m(p) >= threshold`` between lo and hi (arrays).

    ``rejected_at_lo`` says on which side the rejected region is; returns the bracket end that
    is still rejected, i.e. the conservative end of the confidence interval.
    """
    lo, hi = lo.copy(), hi.copy()
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        rejected = log_m(mid) >= threshold
        if rejected_at_lo:
            lo = np.where(rejected, mid, lo)
            hi = np.where(rejected, hi, mid)
        else:
            hi = np.where(rejected, mid, hi)
            lo = np.where(rejected, lo, mid)
    return lo if rejected_at_lo else hi


def betabinomial_cs(successes, trials, alpha, a=1.0, b=1.0, kt_weight=0.0):
    """Beta-binomial mixture confidence sequence for a Bernoulli mean (BRIEF §7).

    ``{p : M_t(p) < 1/alpha}`` with M_t the mixture martingale of prior Beta(a, b). With
    probability >= 1 - alpha the true mean lies inside the interval at *every* t at once, so the
    bounds may be checked after every draw (or batch) and the running max of the lower bound /
    running min of the upper bound kept. The prior (a, b) may depend on anything independent of
    the counted draws; a bad prior widens the interval but never breaks the guarantee.

    Parameters
    ----------
    successes, trials : array_like
        Cumulative hits A_t and draws t (broadcast together).
    alpha : float
        Error probability of the whole sequence (both sides together).
    a, b : float or array_like
        Positive Beta mixing-prior parameters.
    kt_weight : float in [0, 1), default 0
        Weight of Jeffreys' Beta(1/2, 1/2) (the Krichevsky-Trofimov mixture) in a two-part mixing
        prior (1 - w) Beta(a, b) + w Beta(1/2, 1/2): still one mixture, so still a martingale under
        every p, and a prior far from the truth then costs at most a factor 1/w of wealth against
        KT alone (log 2 nats at w = 1/2) instead of all power.

    Returns
    -------
    (lower, upper) : float64 arrays of the broadcast shape.
    """
    k, n = _check_counts(successes, trials)
    alpha = _check_alpha(alpha)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not (np.all(a > 0) and np.all(b > 0) and np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise DataError("Beta prior parameters a and b must be positive and finite")
    k, n, a, b, alpha = np.broadcast_arrays(k, n, a, b, alpha)
    threshold = np.log(1.0 / alpha)
    mean = np.divide(k, n, out=np.full(k.shape, 0.5), where=n > 0)

    log_numerator = special.betaln(a + k, b + n - k) - special.betaln(a, b)  # p-independent
    if not 0.0 <= kt_weight < 1.0:
        raise DataError(f"kt_weight must lie in [0, 1), got {kt_weight}")
    if kt_weight > 0:
        log_kt = special.betaln(0.5 + k, 0.5 + n - k) - special.betaln(0.5, 0.5)
        log_numerator = np.logaddexp(np.log1p(-kt_weight) + log_numerator, np.log(kt_weight) + log_kt)

    def log_m(p):
        return log_numerator - special.xlogy(k, p) - special.xlog1py(n - k, -p)

    zeros, ones = np.zeros_like(mean), np.ones_like(mean)
    lower = _bisect(log_m, zeros, mean, threshold, rejected_at_lo=True)
    upper = _bisect(log_m, mean, ones, threshold, rejected_at_lo=False)
    # The ends are only rejected when the data oppose them (k > 0 rules out p = 0).
    lower = np.where(log_m(zeros) >= threshold, lower, 0.0)
    upper = np.where(log_m(ones) >= threshold, upper, 1.0)
    return lower, upper


def beta_prior_from_mean(mean, concentration, min_param=0.05):
    """Beta(a, b) with the given mean and a + b = ``concentration``; a, b >= ``min_param`` keeps
    some prior mass everywhere, so that a confident but wrong prior cannot stall a sequence."""
    concentration = np.asarray(concentration, dtype=np.float64)
    mean = np.clip(np.asarray(mean, dtype=np.float64), 0.0, 1.0)
    return (np.maximum(mean * concentration, min_param),
            np.maximum((1.0 - mean) * concentration, min_param))


def beta_from_probit(mu_z, var_z, max_concentration=2000.0):
    """Beta(a, b) with the mean and variance of Phi(Z), Z ~ N(mu_z, var_z), elementwise.

    Turns a probit-scale prediction of a probability, with its uncertainty, into a Beta prior;
    N(0, 1) gives Beta(1, 1). ``a + b`` is kept in [2, max_concentration], a, b >= 0.05.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(32)
    weights = weights / weights.sum()
    mu_z, var_z = np.broadcast_arrays(np.asarray(mu_z, np.float64), np.asarray(var_z, np.float64))
    p = special.ndtr(mu_z[..., None] + np.sqrt(var_z)[..., None] * nodes)
    mean = p @ weights
    var = np.maximum(((p - mean[..., None]) ** 2) @ weights, 1e-300)
    concentration = np.clip(mean * (1.0 - mean) / var - 1.0, 2.0, max_concentration)
    return beta_prior_from_mean(mean, concentration)


def wilson_interval(p_hat, n, z):
    """Wilson score interval (lower, upper) at normal quantile ``z``; an approximation for
    planning, not a certificate."""
    p_hat, n = np.asarray(p_hat, np.float64), np.asarray(n, np.float64)
    z2n = z * z / n
    centre = (p_hat + z2n / 2.0) / (1.0 + z2n)
    half = z * np.sqrt(p_hat * (1.0 - p_hat) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    return centre - half, centre + half


def normal_radius(p_lower, sigma):
    """Cohen's radius ``sigma * Phi^{-1}(p_lower)`` (float64; -inf at 0, +inf at 1)."""
    return sigma * special.ndtri(np.asarray(p_lower, dtype=np.float64))


__all__ = [
    "beta_from_probit", "beta_prior_from_mean", "betabinomial_cs", "betabinomial_log_martingale",
    "binomial_test_pvalue", "clopper_pearson_lower", "clopper_pearson_upper",
    "hoeffding_halfwidth", "hoeffding_interval", "normal_radius", "wilson_interval",
]

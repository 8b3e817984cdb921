"""Tests for gmcert.smoothing.stats: exact values, edge cases, and coverage by simulation.

Coverage tests follow one pattern: count how often a bound misses the truth over many seeded
simulations, then ask whether that rate is *provably* above the nominal level (a Clopper-Pearson
lower bound on the observed rate exceeding it), and, where the bound is conservative enough,
whether it is provably at or below it (the CP upper bound). Each such test is paired with a
deliberately invalid procedure that the same check must catch, so the check can fail.
"""
import numpy as np
import pytest
from scipy import special, stats as sps

from gmcert.errors import DataError
from gmcert.smoothing import stats

CHECK_LEVEL = 1e-3  # confidence level of the checks on simulated rates


def rate_bounds(failures, trials):
    """(CP lower, CP upper) on a simulated failure rate, each at level CHECK_LEVEL."""
    return (float(stats.clopper_pearson_lower(failures, trials, CHECK_LEVEL)),
            float(stats.clopper_pearson_upper(failures, trials, CHECK_LEVEL)))


# -- Clopper-Pearson ------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n,alpha", [(1, 10, 0.05), (73, 100, 0.001), (99_990, 100_000, 0.001), (5, 5, 0.2)])
def test_clopper_pearson_solves_the_binomial_tail_equation(k, n, alpha):
    lower = float(stats.clopper_pearson_lower(k, n, alpha))
    upper = float(stats.clopper_pearson_upper(k, n, alpha))
    # The lower bound is the p with P(Bin(n, p) >= k) = alpha; the upper one P(Bin(n, p) <= k) = alpha.
    assert sps.binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-6)
    if k < n:
        assert sps.binom.cdf(k, n, upper) == pytest.approx(alpha, rel=1e-6)
    else:
        assert upper == 1.0


def test_clopper_pearson_edges_and_vectorisation():
    k = np.array([0, 1, 50, 100])
    lower, upper = stats.clopper_pearson_lower(k, 100, 0.01), stats.clopper_pearson_upper(k, 100, 0.01)
    assert lower[0] == 0.0 and upper[-1] == 1.0
    assert np.all(np.diff(lower) > 0) and np.all(np.diff(upper) > 0)
    assert np.all(lower < k / 100 + 1e-12) and np.all(upper > k / 100 - 1e-12)
    # All hits: the lower bound is alpha ** (1 / n) (Cohen's radius for p = 1).
    assert float(stats.clopper_pearson_lower(100_000, 100_000, 1e-3)) == pytest.approx(1e-3 ** 1e-5, rel=1e-12)


@pytest.mark.parametrize("bad", [dict(successes=-1, trials=5), dict(successes=6, trials=5),
                                 dict(successes=np.nan, trials=5)])
def test_clopper_pearson_rejects_bad_counts(bad):
    with pytest.raises(DataError):
        stats.clopper_pearson_lower(alpha=0.05, **bad)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, np.nan])
def test_bad_alpha_is_named(alpha):
    with pytest.raises(DataError, match="alpha"):
        stats.clopper_pearson_upper(3, 10, alpha)


def test_clopper_pearson_coverage_and_a_check_that_can_fail():
    rng = np.random.default_rng(0)
    p, n, alpha, reps = 0.9, 200, 0.05, 40_000
    k = rng.binomial(n, p, size=reps)
    misses = int(np.sum(stats.clopper_pearson_lower(k, n, alpha) > p))
    lo, hi = rate_bounds(misses, reps)
    assert lo <= alpha and hi <= alpha  # CP is conservative: provably at or below alpha here
    # A Wald bound at the same nominal level undercovers near p = 0.9; the check must say so.
    wald = k / n - sps.norm.isf(alpha) * np.sqrt(k / n * (1 - k / n) / n)
    lo_wald, _ = rate_bounds(int(np.sum(wald > p)), reps)
    assert lo_wald > alpha


# -- binomial test, Hoeffding -----------------------------------------------------------------------


def test_binomial_test_matches_scipy_and_is_symmetric():
    assert stats.binomial_test_pvalue(60, 100) == pytest.approx(sps.binomtest(60, 100, 0.5).pvalue)
    assert stats.binomial_test_pvalue(60, 100) == pytest.approx(stats.binomial_test_pvalue(40, 100))
    assert stats.binomial_test_pvalue(50, 100) == pytest.approx(1.0)
    with pytest.raises(DataError):
        stats.binomial_test_pvalue(5, 4)


def test_hoeffding_formula_and_interval():
    assert float(stats.hoeffding_halfwidth(200, 0.05)) == pytest.approx(np.sqrt(np.log(2 / 0.05) / 400))
    assert float(stats.hoeffding_halfwidth(200, 0.05, value_range=2.0, two_sided=False)) == pytest.approx(
        2 * np.sqrt(np.log(1 / 0.05) / 400))
    lo, hi = stats.hoeffding_interval(np.array([0.0, 0.5, 1.0]), 100, 0.05)
    assert lo[0] == 0.0 and hi[-1] == 1.0 and lo[1] < 0.5 < hi[1]
    with pytest.raises(DataError, match="value_range"):
        stats.hoeffding_interval(0.5, 100, 0.05, value_range=(1.0, 0.0))
    with pytest.raises(DataError):
        stats.hoeffding_halfwidth(0, 0.05)


def test_hoeffding_coverage_for_bounded_means_and_a_check_that_can_fail():
    rng = np.random.default_rng(1)
    n, alpha, reps = 50, 0.1, 20_000
    draws = rng.uniform(-1.0, 3.0, size=(reps, n))  # range width 4, mean 1
    lo, hi = stats.hoeffding_interval(draws.mean(1), n, alpha, value_range=(-1.0, 3.0))
    misses = int(np.sum((lo > 1.0) | (hi < 1.0)))
    assert rate_bounds(misses, reps)[1] <= alpha
    # Forgetting the range (width 1 instead of 4) must be caught.
    half = stats.hoeffding_halfwidth(n, alpha)
    wrong = int(np.sum(np.abs(draws.mean(1) - 1.0) > half))
    assert rate_bounds(wrong, reps)[0] > alpha


# -- beta-binomial confidence sequence ----------------------------------------------------------------


def brute_force_cs(k, n, alpha, a, b, grid=200_001):
    """Ends of {p : M_n(p) < 1/alpha} on a fine grid (no monotonicity assumed)."""
    p = np.linspace(0.0, 1.0, grid)
    inside = stats.betabinomial_log_martingale(p, k, n, a, b) < np.log(1 / alpha)
    return p[inside].min(), p[inside].max()


@pytest.mark.parametrize("k,n,a,b", [(0, 10, 1, 1), (7, 10, 1, 1), (10, 10, 1, 1), (930, 1000, 2, 0.5),
                                     (400, 1000, 90, 10), (5, 5000, 0.5, 0.5)])
def test_betabinomial_cs_matches_brute_force_and_errs_outward(k, n, a, b):
    lower, upper = stats.betabinomial_cs(k, n, 0.01, a, b)
    grid_lo, grid_hi = brute_force_cs(k, n, 0.01, a, b)
    step = 1.0 / 200_000
    assert grid_lo - step <= lower <= grid_lo + 1e-9  # never above the true infimum
    assert grid_hi - 1e-9 <= upper <= grid_hi + step
    assert lower <= k / n <= upper


def test_betabinomial_cs_known_all_hits_value():
    # Uniform prior, all hits: M_t(p) = 1 / ((t + 1) p^t), so LCB = (alpha / (t + 1)) ** (1 / t).
    t = np.array([10, 300, 5000])
    lower, upper = stats.betabinomial_cs(t, t, 0.001)
    np.testing.assert_allclose(lower, (0.001 / (t + 1)) ** (1 / t), rtol=1e-12)
    assert np.all(upper == 1.0)


def test_betabinomial_cs_rejects_bad_prior():
    with pytest.raises(DataError, match="prior"):
        stats.betabinomial_cs(3, 10, 0.05, a=0.0)


@pytest.mark.parametrize("prior", [(1.0, 1.0), (900.0, 100.0), (10.0, 990.0)], ids=["uniform", "right", "wrong"])
def test_betabinomial_cs_is_anytime_valid_and_pointwise_cp_is_not(prior):
    """Coverage over the whole path, checked after every 5 draws up to 1000, for good and bad priors."""
    rng = np.random.default_rng(2)
    p, alpha, reps = 0.9, 0.05, 2000
    t = np.arange(5, 601, 5)
    hits = np.cumsum(rng.binomial(5, p, size=(reps, t.size)), axis=1)
    lower, upper = stats.betabinomial_cs(hits, t, alpha, *prior)
    missed = np.any((lower > p) | (upper < p), axis=1)
    assert rate_bounds(int(missed.sum()), reps)[1] <= alpha
    # The same path checked with a fixed-n CP interval at every look is invalid: optional stopping.
    cp_lo = stats.clopper_pearson_lower(hits, t, alpha / 2)
    cp_hi = stats.clopper_pearson_upper(hits, t, alpha / 2)
    naive = np.any((cp_lo > p) | (cp_hi < p), axis=1)
    assert rate_bounds(int(naive.sum()), reps)[0] > alpha


def test_beta_from_probit_moments():
    a, b = stats.beta_from_probit(0.0, 1.0)
    assert a == pytest.approx(1.0, abs=1e-6) and b == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(3)
    mu, var = np.array([1.2, 2.5]), np.array([0.1, 0.3])
    a, b = stats.beta_from_probit(mu, var)
    draws = special.ndtr(mu + np.sqrt(var) * rng.standard_normal((400_000, 2)))
    np.testing.assert_allclose(a / (a + b), draws.mean(0), rtol=2e-3)
    np.testing.assert_allclose(a * b / ((a + b) ** 2 * (a + b + 1)), draws.var(0), rtol=3e-2)
    assert np.all(a + b <= 2000.0)


def test_wilson_is_close_to_clopper_pearson_for_planning():
    z = sps.norm.isf(0.001)
    lo, hi = stats.wilson_interval(0.9, 1000, z)
    assert lo == pytest.approx(float(stats.clopper_pearson_lower(900, 1000, 0.001)), abs=3e-3)
    assert hi == pytest.approx(float(stats.clopper_pearson_upper(900, 1000, 0.001)), abs=3e-3)


def test_normal_radius():
    assert float(stats.normal_radius(0.5, 0.25)) == 0.0
    assert float(stats.normal_radius(special.ndtr(2.0), 0.25)) == pytest.approx(0.5)

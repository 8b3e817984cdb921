"""Serialized smoothing's count correction: the audit's hypergeometric bound covers at its level for
every number of disagreements, and the corrected lower bound stays valid on an adversarial chain
whose warm-started answers lean toward c_A, where the uncorrected count does not."""
import numpy as np
import pytest
from scipy import stats

from gmcert.errors import DataError
from gmcert.smoothing.serialized import audit_indices, hypergeometric_upper, serialized_lower_bound
from gmcert.smoothing.stats import clopper_pearson_lower, clopper_pearson_upper


@pytest.mark.parametrize("n, k, alpha", [(60, 15, 0.1), (40, 40, 0.05), (50, 1, 0.2)])
def test_the_audit_bound_covers_every_number_of_disagreements(n, k, alpha):
    """Exactly, by enumeration: P(D_up(X) < D) <= alpha for every true D, X ~ Hypergeom(n, D, k)."""
    uppers = hypergeometric_upper(np.arange(k + 1), n, k, alpha)
    assert np.all(np.diff(uppers) >= 0) and np.all(uppers >= np.arange(k + 1))
    worst = 0.0
    for D in range(n + 1):
        pmf = stats.hypergeom.pmf(np.arange(k + 1), n, D, k)
        worst = max(worst, float(pmf[uppers < D].sum()))
    assert worst <= alpha + 1e-12
    if k == n:  # auditing the whole chain gives D itself
        assert list(uppers) == list(range(k + 1))
    else:
        assert worst > alpha / 4  # and not far from its level: the bound is not padded


def _chain(rng, trials, n, p_true, lean):
    """Standard answers s_i ~ Bernoulli(p_true) i.i.d.; the warm-started answer copies s_i, except
    that after a c_A answer it also says c_A with probability ``lean`` where s_i does not."""
    s = rng.random((trials, n)) < p_true
    w = np.empty_like(s)
    previous = np.ones(trials, dtype=bool)
    lean_draw = rng.random((trials, n)) < lean
    for i in range(n):
        w[:, i] = s[:, i] | (previous & lean_draw[:, i])
        previous = w[:, i]
    return s, w


def test_corrected_bound_is_valid_on_an_adversarial_chain_and_the_raw_count_is_not():
    rng = np.random.default_rng(0)
    trials, n, k, alpha, p_true = 10_000, 400, 80, 0.05, 0.7
    s, w = _chain(rng, trials, n, p_true, lean=0.5)
    audits = np.stack([audit_indices(n, k, rng) for _ in range(trials)])  # drawn apart from the chain
    rows = np.arange(trials)[:, None]
    disagreements = (w[rows, audits] & ~s[rows, audits]).sum(1)
    p_lower, d_up = serialized_lower_bound(w.sum(1), disagreements, n, k, alpha)
    false = int(np.sum(p_lower > p_true))  # a radius sigma * Phi^-1(p_lower) above the true one
    assert clopper_pearson_upper(false, trials, 0.001) <= alpha, false / trials
    true_d = (w & ~s).sum(1)
    assert np.mean(d_up >= true_d) >= 1 - alpha / 2 - 0.01  # the audit's own level, alpha_2 = alpha / 2
    raw = clopper_pearson_lower(w.sum(1), n, alpha)  # counting warm answers as if they were draws of g
    assert np.mean(raw > p_true) > 0.5  # measured 0.9998
    # discounting by the audit's point estimate X n / K instead of its upper bound: measured 0.17
    point = clopper_pearson_lower(np.maximum(w.sum(1) - np.round(disagreements * n / k).astype(int), 0), n, alpha)
    assert np.mean(point > p_true) > alpha
    # and the correction is not vacuous: on an honest chain (lean 0) it loses little
    s0, w0 = _chain(np.random.default_rng(1), 2000, n, p_true, lean=0.0)
    honest, _ = serialized_lower_bound(w0.sum(1), np.zeros(2000, dtype=int), n, k, alpha)
    assert np.median(honest) > p_true - 0.1


def test_bad_audit_arguments_fail_cleanly():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="audit_size"):
        audit_indices(10, 11, rng)
    with pytest.raises(DataError):
        hypergeometric_upper([5], 10, 4, 0.05)  # more disagreements than audited samples
    with pytest.raises(DataError):
        serialized_lower_bound([5], [0], 10, 4, 0.05, alpha_split=1.0)
    assert sorted(set(audit_indices(10, 10, rng))) == list(range(10))

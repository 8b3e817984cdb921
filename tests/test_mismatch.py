"""Mismatch estimator: k-NN entropy constants, KL against Monte-Carlo truth, Mardia, the bound.

The KL "truth" is KL(P_k || N(fitted mean, fitted covariance)) computed by Monte Carlo with the
exact density of P_k on a large independent sample: the model is fitted on a finite sample, so
that fitted Gaussian (not the population one) is what the estimator measures against.

Calibration behind the tolerances (k=10, reference correction; 8-20 seeds each, not run here):
Gaussian d=4, n=2000 held out: per-class error mean ~0, std 0.012 and 0.007, bootstrap
interval coverage 95-100%. Student-t (df 8) d=4, n=8000: error std ~0.01; two-mode mixture
d=4, n=8000: ~0.006. At n=4000 the Student-t std is ~0.02, hence n=8000 in the accuracy test.
"""
import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.special import digamma
from scipy.stats import kurtosis, multivariate_normal, multivariate_t, skew

from gmcert.mismatch.entropy import gaussian_entropy, knn_distances, knn_entropy, log_unit_ball_volume
from gmcert.errors import DataError
from gmcert.mismatch.divergence import mardia_test, mismatch_report
from gmcert.latent.mixture import GaussianMixtureClassifier

FAST = dict(n_bootstrap=100, n_q_samples=500)


# ----------------------------------------------------------------- k-NN entropy constants
def test_unit_ball_volumes():
    assert log_unit_ball_volume(1) == pytest.approx(math.log(2.0))
    assert log_unit_ball_volume(2) == pytest.approx(math.log(math.pi))
    assert log_unit_ball_volume(3) == pytest.approx(math.log(4.0 / 3.0 * math.pi))


def test_kozachenko_leonenko_by_hand():
    # 1-D, k=1: distances to the nearest other point are 1, 1, 2.
    X = np.array([[0.0], [1.0], [3.0]])
    h = 1.5 + math.log(2.0) + math.log(2.0) / 3  # psi(3) - psi(1) = 1 + 1/2
    assert knn_entropy(X, k=1, whiten=False) == pytest.approx(h, rel=1e-12)
    # 2-D, k=2: second-nearest distances are 4, 5, 5 (a 3-4-5 triangle); psi(3) - psi(2) = 1/2.
    X = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    h = 0.5 + math.log(math.pi) + 2.0 / 3.0 * (math.log(4.0) + 2 * math.log(5.0))
    assert knn_entropy(X, k=2, whiten=False) == pytest.approx(h, rel=1e-12)
    assert float(digamma(3) - digamma(2)) == pytest.approx(0.5)


def test_knn_distances_exact_in_float64_far_from_origin():
    # float32 alone resolves only ~1e-3 at 1e4; the recomputed distances must be float64-exact.
    rng = np.random.default_rng(0)
    X = 1e4 + 1e-3 * rng.standard_normal((400, 3))
    D = cdist(X, X)
    np.fill_diagonal(D, np.inf)
    expected = np.sort(D, axis=1)[:, 2]
    np.testing.assert_allclose(knn_distances(X, 3), expected, rtol=1e-9)


def test_knn_entropy_of_anisotropic_gaussian():
    rng = np.random.default_rng(1)
    A = np.array([[3.0, 0.0, 0.0], [1.0, 0.2, 0.0], [0.5, 0.1, 1.0]])
    X = rng.standard_normal((3000, 3)) @ A.T
    truth = gaussian_entropy(3, 2 * np.log(abs(np.linalg.det(A))))
    assert knn_entropy(X, k=5) == pytest.approx(truth, abs=0.05)


def test_duplicates_warn_and_stay_finite():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((300, 2))
    X = np.concatenate([X, X[:50]])
    with pytest.warns(UserWarning, match="duplicates"):
        h = knn_entropy(X, k=3)
    assert np.isfinite(h)


# ------------------------------------------------------------------------------ Mardia
def test_mardia_reduces_to_univariate_skewness_and_kurtosis():
    x = np.random.default_rng(3).exponential(size=(500, 1))
    rec = mardia_test(x)
    assert rec["skewness"] == pytest.approx(skew(x[:, 0]) ** 2, rel=1e-9)
    assert rec["kurtosis"] == pytest.approx(kurtosis(x[:, 0], fisher=False), rel=1e-9)
    assert rec["skewness_dof"] == 1


def test_mardia_affine_invariant():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((400, 3)) ** 2
    A = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, -3.0], [1.0, 0.0, 1.0]])
    a, b = mardia_test(X), mardia_test(X @ A.T + 7.0)
    for key in ("skewness", "kurtosis", "skewness_p", "kurtosis_p"):
        assert a[key] == pytest.approx(b[key], rel=1e-7)


def test_mardia_gaussian_not_rejected_student_t_rejected():
    for seed in range(3):
        rng = np.random.default_rng(10 + seed)
        rec = mardia_test(rng.standard_normal((600, 4)) @ np.diag([1.0, 2.0, 3.0, 0.5]))
        assert rec["skewness_p"] > 0.01 and rec["kurtosis_p"] > 0.01, rec
        assert rec["skewness_dof"] == 4 * 5 * 6 / 6
    t = multivariate_t(np.zeros(4), np.eye(4), df=5).rvs(1000, random_state=5)
    assert mardia_test(t)["kurtosis_p"] < 1e-6


# ------------------------------------------------------------------------- KL and eps
def _student_t_and_mixture(n, d, df, seed):
    """Class 0: Student-t; class 1: two unit Gaussians at +-2 e_1 (shifted by 5)."""
    rng = np.random.default_rng(seed)
    t = multivariate_t(np.zeros(d), np.eye(d), df=df)
    shift = np.zeros(d)
    shift[0] = 2.0

    def mixture_sample(m):
        return rng.standard_normal((m, d)) + np.outer(2 * rng.integers(0, 2, m) - 1, shift) + 5.0

    def mixture_logpdf(X):
        return np.logaddexp(multivariate_normal(shift + 5.0).logpdf(X),
                            multivariate_normal(-shift + 5.0).logpdf(X)) - math.log(2.0)

    Z = np.concatenate([t.rvs(n, random_state=rng), mixture_sample(n)])
    y = np.repeat([0, 1], n)
    model = GaussianMixtureClassifier(covariance_type="full").fit(Z, y)
    truth = []
    for j, (logpdf, sample) in enumerate([(t.logpdf, t.rvs(200_000, random_state=rng)),
                                          (mixture_logpdf, mixture_sample(200_000))]):
        fitted = multivariate_normal(model.means_[j], model.covariances_[j])
        truth.append(np.mean(logpdf(sample) - fitted.logpdf(sample)))
    return model, Z, y, np.array(truth)


def test_gaussian_data_gives_eps_near_zero():
    # Held-out data, so the in-sample optimism of log N_k does not push eps below 0.
    rng = np.random.default_rng(6)
    A = np.array([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.3, 0.0], [1, 1, 1, 1]])

    def draw(n):
        return (np.concatenate([rng.standard_normal((n, 4)) @ A.T, rng.standard_normal((n, 4)) + 4]),
                np.repeat([0, 1], n))

    model = GaussianMixtureClassifier(covariance_type="full").fit(*draw(2000))
    report = mismatch_report(model, *draw(2000), random_state=0, **FAST)
    assert abs(report.kl) < 0.02
    assert report.kl_interval[0] < 0.01 and report.kl_interval[1] > 0
    # Per class the estimator's spread here is about 0.012 (20 seeds, see the module notes).
    assert np.all(np.abs(report.kl_per_class) < 0.04)
    assert np.all(report.kl_per_class_interval[:, 0] < 0.01)
    assert report.label_kl == pytest.approx(0.0, abs=1e-12)


def test_kl_matches_monte_carlo_truth_for_non_gaussian_classes():
    # d = 4: Student-t (df 8) and a two-mode mixture, each fitted by one Gaussian; two seeds.
    # n = 8000 per class: at 4000 the Student-t tails alone make the error std about 0.02.
    estimates, truths = [], []
    for seed in (0, 1):
        model, Z, y, truth = _student_t_and_mixture(8000, 4, 8, seed)
        estimates.append(mismatch_report(model, Z, y, random_state=seed, **FAST).kl_per_class)
        truths.append(truth)
    estimate, truth = np.mean(estimates, axis=0), np.mean(truths, axis=0)
    assert truth[0] > 0.07 and truth[1] > 0.15  # both really are non-Gaussian
    np.testing.assert_array_less(np.abs(estimate - truth), np.maximum(0.15 * truth, 0.02))


def test_kl_error_shrinks_with_n_in_eight_dimensions():
    errors = {}
    for n in (500, 4000):
        errors[n] = []
        for seed in (0, 1):
            model, Z, y, truth = _student_t_and_mixture(n, 8, 10, seed)
            report = mismatch_report(model, Z, y, random_state=seed, **FAST)
            errors[n].append(np.abs(report.kl_per_class - truth))
    assert np.mean(errors[4000]) < 0.5 * np.mean(errors[500]), errors


def test_joint_eps_adds_label_divergence_when_priors_differ():
    rng = np.random.default_rng(7)
    Z = np.concatenate([rng.standard_normal((600, 2)), rng.standard_normal((400, 2)) + 3])
    y = np.repeat([0, 1], [600, 400])
    model = GaussianMixtureClassifier(priors=[0.3, 0.7]).fit(Z, y)
    report = mismatch_report(model, Z, y, random_state=0, **FAST)
    label_kl = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7)
    assert report.label_kl == pytest.approx(label_kl, rel=1e-12)
    assert report.kl == pytest.approx(0.6 * report.kl_per_class[0] + 0.4 * report.kl_per_class[1]
                                      + label_kl, rel=1e-12)
    assert report.kl_interval[0] > 0.5 * label_kl


# ---------------------------------------------------------------------- bound, report
def _fitted_three_class_model():
    rng = np.random.default_rng(8)
    Z = np.concatenate([rng.standard_normal((500, 3)) * s + c
                        for s, c in ((1.0, 0.0), (0.7, 2.5), (1.3, -2.5))])
    y = np.repeat([0, 1, 2], 500)
    return GaussianMixtureClassifier(covariance_type="full").fit(Z, y)


def test_bound_holds_when_data_come_from_the_model():
    model = _fitted_three_class_model()
    Z, y = model.sample(3000, random_state=1)  # P == Q
    report = mismatch_report(model, Z, y, n_bootstrap=200, n_q_samples=5000, random_state=2)
    radii = np.linspace(0.0, 2.0, 21)
    empirical = report.empirical_certified_accuracy(radii)
    q, q_lo, q_hi = report.certified_accuracy_q(radii)
    bound = report.certified_accuracy_bound(radii)
    assert np.all(empirical >= bound)
    assert np.all(q_lo <= q) and np.all(q <= q_hi)
    assert np.all(np.abs(empirical - q) < 0.05)  # same distribution
    assert bound[0] > 0.5  # not vacuous
    # Conservative = lower end of CertAcc_Q minus sqrt(upper end of eps / 2).
    expected = np.maximum(q_lo - math.sqrt(max(report.kl_interval[1], 0) / 2), 0)
    np.testing.assert_allclose(bound, expected)
    assert np.all(bound <= report.certified_accuracy_bound(radii, conservative=False))


def test_report_outputs(tmp_path):
    model = _fitted_three_class_model()
    Z, y = model.sample(600, random_state=3)
    report = mismatch_report(model, Z, y, random_state=0, **FAST)
    assert report.kl_per_class.shape == (3,) and report.kl_per_class_interval.shape == (3, 2)
    assert np.all(report.kl_per_class_interval[:, 0] <= report.kl_per_class_interval[:, 1])
    assert len(report.mardia) == 3 and {"skewness_p", "kurtosis_p"} <= set(report.mardia[0])
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert json.loads(text)["kl"] == pytest.approx(report.kl)
    table = report.table().splitlines()
    assert len(table) == 5 and table[1].split()[:2] == ["0", str(report.n_per_class[0])]
    path = tmp_path / "plots" / "mismatch.png"
    report.plot(path, radii=np.linspace(0, 1.5, 16))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same seed, same numbers.
    again = mismatch_report(model, Z, y, random_state=0, **FAST)
    assert again.kl_interval == report.kl_interval


# ------------------------------------------------------------------------- bad input
def _small_data():
    rng = np.random.default_rng(9)
    Z = np.concatenate([rng.standard_normal((200, 2)), rng.standard_normal((200, 2)) + 3])
    y = np.repeat([0, 1], 200)
    return GaussianMixtureClassifier().fit(Z, y), Z, y


def test_bad_input_raises_data_error():
    model, Z, y = _small_data()
    keep = np.r_[0:200, 200:205]  # class 1 keeps 5 points
    with pytest.raises(DataError, match="class 1 has 5 points"):
        mismatch_report(model, Z[keep], y[keep], k=5, **FAST)
    bad = Z.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        mismatch_report(model, bad, y, **FAST)
    bad[3, 1] = np.inf
    with pytest.raises(DataError, match="infinite"):
        mismatch_report(model, bad, y, **FAST)
    with pytest.raises(DataError, match="labels"):
        mismatch_report(model, Z, np.where(y == 1, 7, y), **FAST)
    with pytest.raises(DataError, match="shape"):
        mismatch_report(model, Z[:, :1], y, **FAST)
    for kwargs in ({"k": 0}, {"alpha": 1.5}, {"bias_correction": "magic"}):
        with pytest.raises(DataError):
            mismatch_report(model, Z, y, **{**FAST, **kwargs})


def test_dimension_too_large_for_sample():
    rng = np.random.default_rng(10)
    d = 12
    Z = np.concatenate([rng.standard_normal((300, d)), rng.standard_normal((300, d)) + 2])
    y = np.repeat([0, 1], 300)
    model = GaussianMixtureClassifier().fit(Z, y)
    with pytest.warns(UserWarning, match="biased in high dimension"):
        mismatch_report(model, Z, y, random_state=0, **FAST)
    keep = np.r_[0:300, 300:312]  # 12 points in 12 dimensions: hopeless
    with pytest.raises(DataError, match="class 1 has 12 points in d=12"):
        mismatch_report(model, Z[keep], y[keep], **FAST)


def test_degenerate_class_has_infinite_kl():
    model, Z, y = _small_data()
    Z = Z.copy()
    Z[y == 1, 1] = 3.0  # class 1 lives on a line
    with pytest.warns(UserWarning, match="span only 1 of 2"):
        report = mismatch_report(model, Z, y, random_state=0, **FAST)
    assert np.isinf(report.kl_per_class[1]) and np.isfinite(report.kl_per_class[0])
    assert report.kl == math.inf and report.kl_interval == (math.inf, math.inf)
    assert np.all(report.certified_accuracy_bound([0.0, 0.5]) == 0.0)
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["kl"] == "inf"
    assert "KL = inf" in report.table()

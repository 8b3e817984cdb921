"""GaussianMixtureClassifier: scikit-learn conformance, equality with QDA/LDA, streaming
statistics, shrinkage formulas, densities, sampling and bad input."""
import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.covariance import OAS, LedoitWolf, ledoit_wolf_shrinkage, oas
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis, QuadraticDiscriminantAnalysis
from sklearn.utils.estimator_checks import check_estimator

from gmcert.errors import DataError
from gmcert.latent.mixture import GaussianMixtureClassifier, SufficientStatistics, shrunk_covariance

def _data(seed=0, K=3, d=4, n=60, offset=0.0):
    rng = np.random.default_rng(seed)
    Z = np.concatenate([rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d) * 2
                        for _ in range(K)]) + offset
    return Z, np.repeat(np.arange(K) * 2 + 3, n)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")  # pandas/array-API checks
def test_scikit_learn_estimator_checks():
    results = check_estimator(GaussianMixtureClassifier(), on_fail=None)
    failed = [r["check_name"] for r in results if r["status"] == "failed"]
    assert not failed
    assert {"check_classifiers_train", "check_decision_proba_consistency"} <= {r["check_name"] for r in results}


def test_decision_function_follows_scikit_learn_shapes():
    Z, y = _data(K=3)
    clf = GaussianMixtureClassifier().fit(Z, y)
    np.testing.assert_array_equal(clf.decision_function(Z), clf.class_scores(Z))
    binary = GaussianMixtureClassifier().fit(Z[y != 7], y[y != 7])
    scores = binary.class_scores(Z)
    np.testing.assert_array_equal(binary.decision_function(Z), scores[:, 1] - scores[:, 0])


@pytest.mark.parametrize("reg", [0.0, 0.1, 0.7])
def test_full_equals_qda_with_reg_param(reg):
    Z, y = _data(1)
    qda = QuadraticDiscriminantAnalysis(reg_param=reg).fit(Z, y)
    ours = GaussianMixtureClassifier("full", shrinkage=reg, reg_covar=0.0).fit(Z, y)
    np.testing.assert_array_equal(ours.predict(Z), qda.predict(Z))
    np.testing.assert_allclose(ours.predict_proba(Z), qda.predict_proba(Z), atol=1e-10)


@pytest.mark.parametrize("shrinkage,estimator", [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
def test_full_equals_qda_with_covariance_estimator(shrinkage, estimator):
    Z, y = _data(2, d=6, n=15)  # n close to d, where shrinkage matters
    qda = QuadraticDiscriminantAnalysis(solver="eigen", covariance_estimator=estimator()).fit(Z, y)
    ours = GaussianMixtureClassifier("full", shrinkage=shrinkage, reg_covar=0.0).fit(Z, y)
    np.testing.assert_array_equal(ours.predict(Z), qda.predict(Z))
    np.testing.assert_allclose(ours.predict_proba(Z), qda.predict_proba(Z), atol=1e-10)
    assert (ours.shrinkage_ > 0).all()


@pytest.mark.parametrize("solver", ["lsqr", "eigen"])
def test_tied_equals_lda(solver):
    Z, y = _data(3)
    lda = LinearDiscriminantAnalysis(solver=solver).fit(Z, y)
    ours = GaussianMixtureClassifier("tied", reg_covar=0.0).fit(Z, y)
    np.testing.assert_array_equal(ours.predict(Z), lda.predict(Z))
    np.testing.assert_allclose(ours.predict_proba(Z), lda.predict_proba(Z), atol=1e-10)
    # LDA shrinks each class towards tr(S_k)/d I and averages: our shrinkage towards I matches
    # once the pooled covariance has tr/d = 1
    pooled = sum(np.cov(Z[y == k].T, bias=True) * np.mean(y == k) for k in np.unique(y))
    Zs = Z / np.sqrt(np.trace(pooled) / Z.shape[1])
    lda = LinearDiscriminantAnalysis(solver=solver, shrinkage=0.4).fit(Zs, y)
    ours = GaussianMixtureClassifier("tied", shrinkage=0.4, reg_covar=0.0).fit(Zs, y)
    np.testing.assert_array_equal(ours.predict(Zs), lda.predict(Zs))
    np.testing.assert_allclose(ours.predict_proba(Zs), lda.predict_proba(Zs), atol=1e-9)


def test_shrinkage_intensities_match_scikit_learn_and_streaming():
    Z = np.random.default_rng(4).normal(size=(30, 8)) @ np.diag(np.arange(1, 9.0)) + 1e3
    stats = SufficientStatistics.from_data(Z, np.zeros(30), chunk_size=7)
    n, _, scatter, quartic = stats.centered()
    _, s_lw = shrunk_covariance(scatter[0] / n[0], n[0], quartic[0], "ledoit_wolf")
    _, s_oas = shrunk_covariance(scatter[0] / n[0], n[0], quartic[0], "oas")
    np.testing.assert_allclose(s_lw, ledoit_wolf_shrinkage(Z), rtol=1e-9)
    np.testing.assert_allclose(s_oas, oas(Z)[1], rtol=1e-9)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_chunked_partial_and_merged_fits_equal_one_shot(covariance_type):
    Z, y = _data(5, offset=1e6)  # far from the origin: naive sums of squares would cancel
    one = GaussianMixtureClassifier(covariance_type, shrinkage="ledoit_wolf").fit(Z, y)
    chunked = GaussianMixtureClassifier(covariance_type, shrinkage="ledoit_wolf", chunk_size=7).fit(Z, y)
    partial = GaussianMixtureClassifier(covariance_type, shrinkage="ledoit_wolf")
    order = np.random.default_rng(0).permutation(len(Z))
    for part in np.array_split(order, 5):
        partial.partial_fit(Z[part], y[part], classes=np.unique(y))
    halves = [SufficientStatistics.from_data(Z[p], y[p]) for p in np.array_split(order, 2)]
    merged = (halves[0] + halves[1]).centered()
    exact = [np.cov(Z[y == k].T, bias=True) for k in np.unique(y)]
    np.testing.assert_allclose(merged[2] / merged[0][:, None, None], exact, rtol=1e-9, atol=1e-9)
    for other in (chunked, partial):
        np.testing.assert_allclose(other.covariances_, one.covariances_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(other.means_, one.means_, rtol=1e-14)
        np.testing.assert_array_equal(other.predict(Z), one.predict(Z))
    np.testing.assert_allclose(one.statistics_.centered()[2] / 60, exact, rtol=1e-9, atol=1e-9)


def test_scores_probabilities_and_class_densities():
    Z, y = _data(6)
    clf = GaussianMixtureClassifier(priors=[0.5, 0.3, 0.2]).fit(Z, y)
    S = clf.class_scores(Z)
    half = S / 2
    np.testing.assert_allclose(clf.predict_proba(Z), np.exp(half) / np.exp(half).sum(1, keepdims=True),
                               rtol=1e-10, atol=1e-300)
    loglik = clf.class_log_likelihood(Z)
    for k in range(3):
        ref = multivariate_normal(clf.means_[k], clf.covariances_[k]).logpdf(Z)
        np.testing.assert_allclose(loglik[:, k], ref, rtol=1e-9)
    np.testing.assert_allclose(clf.priors_, [0.5, 0.3, 0.2])


def test_two_components_per_class_model_a_bimodal_class():
    rng = np.random.default_rng(7)
    blobs = [rng.normal(size=(150, 2)) * 0.3 + c for c in ([-3, 0], [3, 0], [0, 0])]
    Z, y = np.concatenate(blobs), np.repeat([0, 0, 1], 150)  # class 0 = two far blobs around class 1
    one = GaussianMixtureClassifier(n_components_per_class=1).fit(Z, y)
    two = GaussianMixtureClassifier(n_components_per_class=2, random_state=0).fit(Z, y)
    assert two.score(Z, y) > 0.99 and two.score(Z, y) > one.score(Z, y)
    assert two.component_means_.shape == (4, 2) and list(two.component_class_) == [0, 0, 1, 1]
    np.testing.assert_allclose(np.exp(two.component_log_weights_).sum(), 1.0)
    np.testing.assert_allclose(np.sort(np.abs(two.component_means_[:2, 0])), [3, 3], atol=0.1)
    # class density = weighted sum of its component densities
    w = np.exp(two.component_log_weights_[:2]) / np.exp(two.component_log_weights_[:2]).sum()
    dens = sum(w[j] * multivariate_normal(two.component_means_[j], np.linalg.inv(two.component_precisions_[j]))
               .pdf(Z[:5]) for j in range(2))
    np.testing.assert_allclose(two.class_log_likelihood(Z[:5])[:, 0], np.log(dens), rtol=1e-9)
    with pytest.raises(ValueError, match="partial_fit"):
        GaussianMixtureClassifier(n_components_per_class=2).partial_fit(Z, y)


def test_sample_draws_from_the_fitted_mixture():
    Z, y = _data(8, d=3)
    clf = GaussianMixtureClassifier().fit(Z, y)
    S, labels = clf.sample(30000, random_state=0)
    assert S.shape == (30000, 3) and S.dtype == np.float64 and set(labels) <= set(clf.classes_)
    for k, label in enumerate(clf.classes_):
        assert abs(np.mean(labels == label) - clf.priors_[k]) < 0.02
        scale = np.diag(clf.covariances_[k]).max()
        np.testing.assert_allclose(S[labels == label].mean(0), clf.means_[k], atol=0.15 * np.sqrt(scale))
        np.testing.assert_allclose(np.cov(S[labels == label].T), clf.covariances_[k], atol=0.1 * scale)
    np.testing.assert_array_equal(clf.sample(5, random_state=1)[0], clf.sample(5, random_state=1)[0])


def test_string_labels_and_unknown_labels():
    Z, y = _data(9)
    names = np.array(["cat", "dog", "emu"])[(y - 3) // 2]
    clf = GaussianMixtureClassifier().fit(Z, names)
    assert set(clf.predict(Z)) <= {"cat", "dog", "emu"} and clf.score(Z, names) > 0.9
    with pytest.raises(DataError, match="gnu"):
        clf.score(Z, np.where(names == "cat", "gnu", names))
    with pytest.raises(DataError, match="not among"):
        clf.partial_fit(Z, np.where(names == "cat", "gnu", names))


@pytest.mark.parametrize("Z,match", [
    (np.full((5, 4), np.nan), "NaN"), (np.full((5, 4), np.inf), "infinity"),
    (np.zeros(4), "2D"), (np.zeros((5, 4, 1)), "dim 3"), (np.zeros((5, 3)), "3 features"),
    (np.zeros((0, 4)), "0 sample")])
def test_bad_latents_raise_data_error(Z, match):
    clf = GaussianMixtureClassifier().fit(*_data(10))
    for method in (clf.predict, clf.decision_function, clf.certify, clf.class_log_likelihood):
        with pytest.raises(DataError, match=match):
            method(Z)


def test_bad_training_data_raise_data_error():
    Z, y = _data(11)
    with pytest.raises(DataError, match="fewer than 2 samples"):
        GaussianMixtureClassifier().fit(Z[:121], y[:121])  # class 7 has one sample
    with pytest.raises(DataError, match="2 classes"):
        GaussianMixtureClassifier().fit(Z[:60], y[:60])
    with pytest.raises(DataError, match="NaN"):
        GaussianMixtureClassifier().fit(np.where(Z > 3, np.nan, Z), y)
    with pytest.raises(DataError, match="singular"):
        GaussianMixtureClassifier(reg_covar=0.0).fit(np.c_[Z, Z[:, :1]], y)  # collinear column
    with pytest.raises(DataError, match="0 sample"):
        GaussianMixtureClassifier().fit(np.zeros((0, 4)), [])
    partial = GaussianMixtureClassifier().partial_fit(Z[:61], y[:61], classes=np.unique(y))
    with pytest.raises(DataError, match="fewer than 2 samples so far"):
        partial.predict(Z)


@pytest.mark.parametrize("params", [
    {"covariance_type": "banana"}, {"shrinkage": 1.5}, {"shrinkage": "auto"}, {"reg_covar": -1.0},
    {"n_components_per_class": 0}, {"chunk_size": 2.5}, {"priors": [0.5, 0.5]}, {"priors": [0.9, 0.2, -0.1]}])
def test_bad_parameters_are_named(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        GaussianMixtureClassifier(**params).fit(*_data(12))

"""The streamed fit (batched float64 sums, PCA from the streamed scatter) against the in-memory fit
it replaces: the same projection, head and certificates, up to rounding, on digits."""
import numpy as np
import pytest

from gmcert.data import load_dataset
from gmcert.encoders.projection import PCAProjection
from gmcert.errors import DataError
from gmcert.latent import streaming
from gmcert.latent.mixture import GaussianMixtureClassifier
from gmcert.pipeline import Pipeline

RTOL = 1e-10


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", channels=None)  # raw 1x8x8 pixels in [0, 1]
    order = np.random.default_rng(0).permutation(len(data))
    return data.images.numpy()[order], data.labels[order]


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """256-row batches: 1400 digits stream in 6 batches, the last one short."""
    monkeypatch.setattr(streaming, "BATCH_VALUES", 1)


def _in_memory(X, y, head, k):
    """Today's fit, step by step: every latent in float64, PCA by SVD, the head on all rows."""
    raw = X.reshape(len(X), -1).astype(np.float64)
    projection = PCAProjection(k).fit(raw)
    return projection, head.fit(projection.transform(raw), y)


def _close(a, b, scale=None):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.abs(b).max() if scale is None else scale
    assert np.abs(a - b).max() <= RTOL * max(scale, 1e-300), np.abs(a - b).max() / scale


HEADS = [dict(covariance_type="full", shrinkage="ledoit_wolf"), dict(covariance_type="tied", shrinkage="oas"),
         dict(covariance_type="diag", shrinkage=0.1), dict(covariance_type="spherical", shrinkage=None),
         dict(covariance_type="full", shrinkage=None, reg_covar=1e-3)]


@pytest.mark.parametrize("params", HEADS, ids=lambda p: f"{p['covariance_type']}-{p['shrinkage']}")
def test_streamed_fit_equals_the_in_memory_fit(digits, params):
    X, y = digits
    k = 24  # the top 24 variances of digits are well separated: the principal basis is unique
    streamed = Pipeline(encoder="identity", n_components=k, head=GaussianMixtureClassifier(**params)).fit(
        X[:1400], y[:1400])
    projection, head = _in_memory(X[:1400], y[:1400], GaussianMixtureClassifier(**params), k)
    _close(streamed.projection.mean_, projection.mean_)
    _close(streamed.projection.components_, projection.components_, 1.0)
    _close(streamed.projection.explained_variance_, projection.explained_variance_)
    got = streamed.head
    for name in ("priors_", "means_", "covariances_", "shrinkage_", "component_log_dets_"):
        _close(getattr(got, name), getattr(head, name), max(np.abs(getattr(head, name)).max(), 1.0))
    _close(got.component_precisions_, head.component_precisions_)
    np.testing.assert_array_equal(got.statistics_.count, head.statistics_.count)
    test = X[1400:]
    Z = projection.transform(test.reshape(len(test), -1).astype(np.float64))
    np.testing.assert_array_equal(streamed.predict(test), head.predict(Z))
    radii = np.array([c.latent_radius for c in streamed.certify(test)])
    _close(radii, head.certify(Z)[1])


def test_degenerate_spectrum_gives_the_same_classifier(digits):
    """PCA 64 of digits' 64 pixels: some pixels never vary, so the trailing principal basis is not
    unique and the two fits may choose different ones; the classifier and its radii agree."""
    X, y = digits
    streamed = Pipeline(encoder="identity", n_components=64).fit(X[:1400], y[:1400])
    projection, head = _in_memory(X[:1400], y[:1400], streamed.head.__class__(**streamed.head.get_params()), 64)
    test = X[1400:]
    Z = projection.transform(test.reshape(len(test), -1).astype(np.float64))
    np.testing.assert_array_equal(streamed.predict(test), head.predict(Z))
    certs = streamed.certify(test)
    np.testing.assert_allclose([c.latent_radius for c in certs], head.certify(Z)[1], rtol=1e-7, atol=1e-9)
    assert streamed.input_lipschitz() == (pytest.approx(1.0), "exact")


def test_latent_inputs_without_projection(digits):
    X, y = digits
    Z = X.reshape(len(X), -1)[:1400].astype(np.float64) @ np.random.default_rng(1).normal(size=(64, 12))
    streamed = Pipeline(encoder="none", projection="none").fit(Z, y[:1400])
    head = GaussianMixtureClassifier(covariance_type="full", shrinkage="ledoit_wolf").fit(Z, y[:1400])
    _close(streamed.head.covariances_, head.covariances_)
    _close(streamed.head.means_, head.means_)


def test_card_encoder_streams_its_float32_latents(digits):
    """A card encodes once; its float32 latents stream in float64 batches to the same fit."""
    X, y = digits
    X = np.repeat(X[:400], 3, axis=1)
    pipe = Pipeline(encoder="timm:test_efficientnet", pretrained=False, n_components=8, device="cpu")
    raw = pipe.raw_latents(X)
    streamed = pipe.fit(X, y[:400])
    projection, head = _in_memory(raw, y[:400], GaussianMixtureClassifier(covariance_type="full",
                                                                          shrinkage="ledoit_wolf"), 8)
    _close(streamed.projection.explained_variance_, projection.explained_variance_)
    _close(streamed.head.means_, head.means_, max(np.abs(head.means_).max(), 1.0))


def test_heads_that_need_the_latents_keep_the_in_memory_path(digits, monkeypatch):
    X, y = digits
    calls = []
    monkeypatch.setattr(Pipeline, "_fit_streamed", lambda self, *a: calls.append(a))
    em = GaussianMixtureClassifier(n_components_per_class=2, random_state=0)
    assert Pipeline(encoder="identity", n_components=8, head=em).fit(X[:600], y[:600]).head.means_.shape == (20, 8)
    Pipeline(encoder="identity", n_components=8).fit(X[:600], y[:600], noise_sigma=0.25)
    assert calls == []


def test_streamed_fit_refuses_what_the_in_memory_fit_refuses(digits):
    X, y = digits
    bad = X[:300].copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN or inf"):
        Pipeline(encoder="identity", n_components=8).fit(bad, y[:300])
    with pytest.raises(DataError, match="n_components"):
        Pipeline(encoder="identity", n_components=65).fit(X[:300], y[:300])
    with pytest.raises(DataError, match="shape"):
        Pipeline(encoder="identity", n_components=8).fit(X[:300, 0], y[:300])
    with pytest.raises(DataError, match="y must have shape"):
        Pipeline(encoder="identity", n_components=8).fit(X[:300], y[:200])
    with pytest.raises(DataError, match="2 classes"):
        Pipeline(encoder="identity", n_components=8).fit(X[:300], np.zeros(300, dtype=int))

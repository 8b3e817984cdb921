"""Pipelines end to end: pixel-space attacks against exact input radii, files, held-out accuracy."""
import numpy as np
import pytest
import torch

from gmcert.data import load_dataset
from gmcert.latent.mixture import GaussianMixtureClassifier
from gmcert.pipeline import Pipeline


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", channels=None)  # raw 1x8x8 pixels in [0, 1]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data))
    return data.images.numpy()[order], data.labels[order]


@pytest.fixture(scope="module")
def raw_pca(digits):
    X, y = digits
    head = GaussianMixtureClassifier(covariance_type="full", shrinkage="ledoit_wolf")
    return Pipeline(encoder="identity", projection="pca", n_components=24, head=head).fit(X[:1400], y[:1400])


def _pgd_flips(module, x, label_index, radius, steps=60, starts=4, seed=0):
    """Projected gradient on the score margin in pixel space, inside the ball of ``radius``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float64)
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(starts):
        delta = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * radius.view(-1, 1, 1, 1) * 0.5
        for step in range(steps):
            delta.requires_grad_(True)
            scores = module(x + delta)
            own = scores.gather(1, label_index[:, None])[:, 0]
            other = scores.masked_fill(torch.nn.functional.one_hot(label_index, scores.shape[1]).bool(),
                                       -torch.inf).max(1).values
            margin = own - other
            flipped |= (margin < 0).detach()
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
                delta = delta - radius.view(-1, 1, 1, 1) * 0.1 * g
                norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                delta = delta * torch.clamp(radius.view(-1, 1, 1, 1) / norm, max=1.0)
        with torch.no_grad():
            scores = module(x + delta)
            flipped |= scores.argmax(1) != label_index
    return flipped.numpy()


def test_pixel_attack_never_breaks_exact_input_radius(raw_pca, digits):
    X, _ = digits
    X_test = X[1400:1520]
    certs = raw_pca.certify(X_test)
    assert {c.radius_kind for c in certs} == {"exact"}
    radius = np.array([c.radius for c in certs])
    assert np.allclose(radius, [c.latent_radius for c in certs])  # orthonormal encoder: L = 1
    classes = list(raw_pca.head.classes_)
    index = torch.as_tensor([classes.index(c.prediction) for c in certs])
    module = raw_pca.torch_module(dtype=torch.float64)
    inside = _pgd_flips(module, X_test, index, torch.as_tensor(radius * (1 - 1e-6)))
    assert not inside.any(), f"{inside.sum()} predictions changed strictly inside their exact radius"
    # The same attack is strong enough to find flips just outside the radius, so it would have
    # caught an overestimate.
    outside = _pgd_flips(module, X_test, index, torch.as_tensor(radius * 1.05))
    assert outside.mean() > 0.8


def test_lower_bound_methods_never_claim_exact(raw_pca, digits):
    X, _ = digits
    closed = raw_pca.certify(X[1400:1450], method="closed_form")
    exact = raw_pca.certify(X[1400:1450], method="exact")
    assert {c.radius_kind for c in closed} == {"bound"} and {c.radius_kind for c in exact} == {"exact"}
    assert all(c.radius <= e.radius for c, e in zip(closed, exact))


def test_torch_module_agrees_with_head(raw_pca, digits):
    X, _ = digits
    expected = raw_pca.predict(X[1400:])
    with torch.no_grad():
        scores = raw_pca.torch_module(dtype=torch.float64)(torch.as_tensor(X[1400:], dtype=torch.float64))
    got = raw_pca.head.classes_[scores.argmax(1).numpy()]
    assert np.mean(got == expected) == 1.0


def test_pipeline_save_load_roundtrip(raw_pca, digits, tmp_path):
    X, _ = digits
    raw_pca.save(tmp_path / "model")
    again = Pipeline.load(tmp_path / "model")
    a, b = raw_pca.certify(X[1400:1500]), again.certify(X[1400:1500])
    assert [c.prediction for c in a] == [c.prediction for c in b]
    assert [c.radius for c in a] == [c.radius for c in b]
    raw_pca.save(tmp_path / "model")  # overwriting an existing model directory is atomic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.slow
def test_default_pipeline_heldout_accuracy():
    """digits -> pretrained efficientnet_lite0 -> PCA 64 -> full covariance with shrinkage."""
    data = load_dataset("digits")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data))
    train, test = order[:1350], order[1350:]
    pipeline = Pipeline()  # the embedded default
    Z = pipeline.raw_latents(data.images.numpy())  # encode once, fit and test on slices
    from gmcert.encoders.projection import make_projection

    pipeline.projection = make_projection("pca", 64)
    pipeline.head.fit(pipeline.projection.fit_transform(Z[train]), data.labels[train])
    accuracy = np.mean(pipeline.head.predict(pipeline.projection.transform(Z[test])) == data.labels[test])
    assert accuracy >= 0.90, f"held-out accuracy {accuracy:.3f}"


def test_noise_augmented_head_is_a_better_smoothing_base(digits):
    """Gaussian data augmentation: under noise at the trained sigma, the augmented pipeline's base
    accuracy beats the clean-fitted one (and both stay ordinary pipelines)."""
    X, y = digits
    sigma = 0.5
    clean = Pipeline(encoder="identity", n_components=24).fit(X[:1400], y[:1400])
    noisy = Pipeline(encoder="identity", n_components=24).fit(X[:1400], y[:1400], noise_sigma=sigma,
                                                             noise_copies=2, random_state=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.as_tensor(X[1400:]).repeat(4, 1, 1, 1)
    x = x + sigma * torch.randn(x.shape, generator=gen)
    labels = np.tile(y[1400:], 4)
    with torch.no_grad():
        acc = {name: np.mean(p.head.classes_[p.torch_module()(x).argmax(1).numpy()] == labels)
               for name, p in (("clean", clean), ("noisy", noisy))}
    assert acc["noisy"] > acc["clean"] + 0.05, acc  # measured: clean 0.39, noisy 0.76
    with pytest.raises(ValueError, match="noise_sigma"):
        Pipeline(encoder="identity").fit(X[:100], y[:100], noise_sigma=-1.0)

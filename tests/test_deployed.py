"""The certificate holds for the classifier as it runs: ``Pipeline.predict`` (certified arithmetic,
the default) never changes its label inside a reported closed-form radius, at float precision,
next to decision boundaries; ``torch_module(dtype=float64)`` runs end to end."""
import numpy as np
import pytest
import torch
from torch import nn

from gmcert.data import load_dataset
from gmcert.errors import DataError
from gmcert.latent.mixture import GaussianMixtureClassifier
from gmcert.pipeline import Pipeline


def _bisect(predict, a, b, steps):
    """Pairs with different labels moved ``steps`` halvings towards the boundary between them."""
    la, lb = predict(a), predict(b)
    a, b = a[la != lb], b[la != lb]
    for _ in range(steps):
        mid = (a + b) / 2
        same = (predict(mid) == predict(a)).reshape((-1,) + (1,) * (a.ndim - 1))
        a, b = np.where(same, mid, a), np.where(same, b, mid)
    return np.concatenate([a, b])


def _near_boundary(pipe, X):
    half = len(X) // 2
    # 20 to 50 halvings of a unit-size segment: from comfortably inside the radius's resolution
    # down to within float64 rounding of the boundary
    return np.concatenate([_bisect(pipe.predict, X[:half], X[half:], s) for s in (20, 35, 45, 52)])


@pytest.fixture(scope="module")
def linear_pipe():
    """The review's setting: a linear encoder on 16x16 images and a full-covariance head."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(0.3, 0.7, size=(3, 1, 16, 16))
    labels = rng.integers(0, 3, 1200)
    X = np.clip(centres[labels] + rng.normal(0, 0.08, (1200, 1, 16, 16)), 0, 1)
    pipe = Pipeline(encoder="identity", n_components=16,
                    head=GaussianMixtureClassifier(covariance_type="full", reg_covar=1e-3))
    return pipe.fit(X[:900], labels[:900]), X[900:]


def _flips(predict, X, labels, radius, direction, seed=1):
    """Label changes of ``predict`` at points within ``radius``: along the exact function's nearest
    flip and on the sphere of the radius."""
    r = radius[:, None, None, None]
    flips = sum((predict(X + t * r * direction) != labels).sum() for t in (0.25, 0.9, 0.999999, 1.0))
    rng = np.random.default_rng(seed)
    for _ in range(20):
        d = rng.standard_normal(X.shape)
        d /= np.linalg.norm(d.reshape(len(X), -1), axis=1)[:, None, None, None]
        flips += (predict(X + r * d) != labels).sum()
    return int(flips)


def test_predict_never_flips_inside_exact_radii_next_to_boundaries(linear_pipe):
    pipe, pool = linear_pipe
    X = _near_boundary(pipe, pool)
    labels, radius, direction = _certify_with_directions(pipe, X)
    assert (pipe.predict(X) == labels).all()  # certify reports predict's label, also at r = 0
    assert (radius == 0).sum() > 10 and (radius > 0).sum() > 50  # both regimes are exercised
    assert _flips(pipe.predict, X, labels, radius, direction) == 0
    # the attack is one that finds the boundary: just past the radius most positive rows flip
    beyond = pipe.predict(X + (1.001 * radius[:, None, None, None] + 1e-15) * direction) != labels
    assert beyond[radius > 1e-9].mean() > 0.9


def test_the_same_attack_flips_a_float32_predict(linear_pipe):
    """The review's demonstration: float32 latents flip inside the certified balls, so the check
    above can fail."""
    pipe, pool = linear_pipe
    X = _near_boundary(pipe, pool)
    labels, radius, direction = _certify_with_directions(pipe, X)
    mean, C = pipe.projection.mean_.astype(np.float32), pipe.projection.components_.T.astype(np.float32)

    def predict32(x):
        z = (x.reshape(len(x), -1).astype(np.float32) - mean) @ C
        return pipe.head.classes_[pipe.head._class_scores(z.astype(np.float64)).argmax(1)]

    assert _flips(predict32, X, labels, radius, direction) > 0


def _certify_with_directions(pipe, X):
    certs = pipe.certify(X)
    _, _, u = pipe.head.certify(pipe.latents(X), return_direction=True)
    d = (u @ pipe.projection.components_).reshape(X.shape)  # the PCA rows lift z-directions to pixels
    norms = np.linalg.norm(d.reshape(len(X), -1), axis=1)
    d = d / np.where(norms > 0, norms, 1.0)[:, None, None, None]
    return np.array([c.prediction for c in certs]), np.array([c.radius for c in certs]), d


def _card_like_pipe():
    data = load_dataset("digits", channels=None)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(96, 16)).eval()
    pipe = Pipeline(encoder=encoder, projection="none",
                    head=GaussianMixtureClassifier(covariance_type="full", reg_covar=1e-2))
    return pipe.fit(data.images[:600].numpy(), data.labels[:600]), data.images[600:840].double().numpy()


def test_predict_never_flips_inside_bound_radii_of_a_conv_encoder():
    from attacks import attack, float64_module

    pipe, pool = _card_like_pipe()
    X = _near_boundary(pipe, pool)
    certs = pipe.certify(X)
    labels, radius = np.array([c.prediction for c in certs]), np.array([c.radius for c in certs])
    assert (pipe.predict(X) == labels).all()
    assert (radius == 0).any() and (radius > 0).sum() > 20
    module = float64_module(pipe)
    index = torch.as_tensor(np.searchsorted(pipe.head.classes_, labels))
    # the attack's end points, then the predict that users run, at each of them and along rays
    pos = radius > 0  # (a zero radius claims nothing)
    assert not attack(module, X[pos], index[pos], radius[pos], steps=30, starts=2).any()
    rng, flips = np.random.default_rng(2), 0
    for _ in range(10):
        d = rng.standard_normal(X.shape)
        d /= np.linalg.norm(d.reshape(len(X), -1), axis=1)[:, None, None, None]
        flips += (pipe.predict(X + radius[:, None, None, None] * d) != labels).sum()
    assert flips == 0


def test_torch_module_float64_runs_end_to_end():
    pipe, pool = _card_like_pipe()
    X = pool[:50]
    module = pipe.torch_module(dtype=torch.float64)
    with torch.no_grad():
        scores = module(torch.as_tensor(X, dtype=torch.float64))
    assert scores.dtype == torch.float64 and scores.shape == (50, len(pipe.head.classes_))
    assert (pipe.head.classes_[scores.argmax(1).numpy()] == pipe.predict(X)).mean() == 1.0
    assert next(pipe.encoder.parameters()).dtype == torch.float32  # the pipeline's own encoder is untouched
    with torch.no_grad():
        fast = pipe.torch_module()(torch.as_tensor(X, dtype=torch.float32))
    assert fast.dtype == torch.float32


def test_predict_arithmetic_is_checked(linear_pipe):
    pipe, pool = linear_pipe
    assert (pipe.predict(pool[:20], arithmetic="fast") == pipe.predict(pool[:20])).all()
    with pytest.raises(DataError, match="arithmetic"):
        pipe.predict(pool[:2], arithmetic="float16")


def test_closed_form_rows_keep_their_route_next_to_a_class_that_never_takes_it(linear_pipe):
    """The review's hybrid case: class 1's mismatch makes its threshold infinite. Inside a closed-form
    row's radius every x' computes the row's class (so looks up its threshold, not class 1's) and
    stays on the closed form or the band, never on smoothing."""
    from gmcert.hybrid import FallbackPolicy, routed_certificate

    pipe, pool = linear_pipe
    policy = FallbackPolicy(route_threshold=0.0, mismatch_threshold=1.0, kl_per_class={0: 0.0, 1: 5.0, 2: 0.0})
    X = _near_boundary(pipe, pool)
    labels, radius, direction = _certify_with_directions(pipe, X)
    classes = [int(c) for c in pipe.head.classes_]
    certs = [routed_certificate(policy, classes, c) if policy.route(c) == "closed_form" else None
             for c in pipe.certify(X)]
    rows = np.array([c is not None for c in certs])
    assert rows.sum() > 20 and np.isin(labels[~rows], [1]).any()  # class 1's side goes to smoothing
    r = np.array([c.radius for c in certs if c is not None])[:, None, None, None]
    moved = [X[rows] + t * r * direction[rows] for t in (0.5, 0.999999, 1.0)]
    rng = np.random.default_rng(4)
    for _ in range(5):
        d = rng.standard_normal(X[rows].shape)
        moved.append(X[rows] + r * d / np.linalg.norm(d.reshape(len(d), -1), axis=1)[:, None, None, None])
    for Xp in moved:
        again = pipe.certify(Xp)
        assert [c.prediction for c in again] == list(labels[rows])
        assert all(policy.route(c) != "smoothing" for c in again)


def test_a_radius_that_does_not_cover_predict_never_routes_closed_form():
    from gmcert.hybrid import FallbackPolicy
    from gmcert.results import Certificate

    policy = FallbackPolicy(route_threshold=0.1)
    shaved = Certificate(3, 0.5, "exact", "closed_form", extra={"covers_predict": True, "radius_upper": 0.5})
    unshaved = Certificate(3, 0.5, "exact", "closed_form", extra={"radius_upper": 0.5})
    assert policy.route(shaved) == "closed_form" and policy.route(unshaved) == "band"

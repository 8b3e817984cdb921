"""Input radii hold for the inputs they are reported for: the Lipschitz constant follows the input
size and the encoder, and the encoder's rounding error is part of the certificate."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from gmcert.data import Resize, load_dataset, resize_images
from gmcert.errors import ModelFileError
from gmcert.latent.mixture import GaussianMixtureClassifier
from gmcert.pipeline import Pipeline

from attacks import attack as _attack, float64_module as _float64_module


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", channels=None)  # 1x8x8 in [0, 1]
    return data.images, data.labels


def _toy_encoder():
    """Nearest resize to 16x16 then flatten; the PCA after it gives the review's orthonormal map."""
    return nn.Sequential(Resize((16, 16), "nearest"), nn.Flatten()).eval()


def test_radius_follows_the_input_size(digits):
    """Fit on 16x16, certify 4x4: the nearest resize stretches a 4x4 perturbation 4 times."""
    images, labels = digits
    # 4x4 digits, shown at 16x16 for the fit: the PCA rows then lie where the resize maps 4x4
    # images, so the map is exactly 4 times an isometry on them and the radius is 4 times smaller
    big = resize_images(torch.nn.functional.avg_pool2d(images[:1200], 2), (16, 16), "nearest").numpy()
    small = torch.nn.functional.avg_pool2d(images[1300:1360], 2).numpy()
    pipe = Pipeline(encoder=_toy_encoder(), projection="pca", n_components=12,
                    head=GaussianMixtureClassifier(covariance_type="tied", reg_covar=1e-3)).fit(big, labels[:1200])
    L_fit, _ = pipe.input_lipschitz()
    L_small, kind = pipe.input_lipschitz(input_shape=small.shape[1:])
    assert L_fit == pytest.approx(1.0, rel=1e-6) and L_small == pytest.approx(4.0, rel=1e-6) and kind == "bound"
    certs = pipe.certify(small)
    radius = np.array([c.radius for c in certs])
    latent = np.array([c.latent_radius for c in certs])
    assert np.all(radius <= latent / 4 * (1 + 1e-6)) and (radius > 0).mean() > 0.8
    classes = list(pipe.head.classes_)
    index = torch.as_tensor([classes.index(c.prediction) for c in certs])
    module = _float64_module(pipe)
    assert not _attack(module, small, index, radius * 0.999).any()
    # the attack finds flips at the old, shape-blind radius (latent / 1): it would catch the bug
    assert _attack(module, small, index, latent * 0.999).mean() > 0.8


def test_a_changed_card_is_refused_on_load(tmp_path, digits):
    card = tmp_path / "tiny.toml"
    text = ('name = "tiny"\narchitecture = "tf_efficientnet_lite0"\ninput_size = [3, 16, 16]\n'
            'mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\ninterpolation = "bilinear"\nfeature_dim = 1280\n')
    card.write_text(text)
    images, labels = digits
    X = images[:60].expand(-1, 3, -1, -1).numpy()
    pipe = Pipeline(encoder=str(card), pretrained=False, n_components=8).fit(X, labels[:60])
    L = pipe.input_lipschitz()[0]
    pipe.save(tmp_path / "model")
    assert Pipeline.load(tmp_path / "model").encoder is not None  # unchanged card: loads
    card.write_text(text.replace("mean = [0.5, 0.5, 0.5]", "mean = [0.4, 0.5, 0.5]"))
    with pytest.raises(ModelFileError, match="mean"):
        Pipeline.load(tmp_path / "model").encoder
    card.write_text(text.replace("input_size = [3, 16, 16]", "input_size = [3, 24, 24]"))
    with pytest.raises(ModelFileError, match="input_size"):
        Pipeline.load(tmp_path / "model").certify(X[:4])
    # a forged constant in pipeline.json is never trusted: it is recomputed from the encoder
    card.write_text(text)
    meta = json.loads((tmp_path / "model" / "pipeline.json").read_text())
    assert [entry["L"] for entry in meta["lipschitz"].values()] == [pytest.approx(L)]
    meta["lipschitz"] = {key: {**entry, "L": 1e-3} for key, entry in meta["lipschitz"].items()}
    (tmp_path / "model" / "pipeline.json").write_text(json.dumps(meta))
    assert Pipeline.load(tmp_path / "model").input_lipschitz()[0] == pytest.approx(L)


def test_nearly_orthonormal_projection_is_not_exact(digits):
    images, labels = digits
    X = images.numpy()
    pipe = Pipeline(encoder="identity", n_components=16).fit(X[:1000], labels[:1000])
    assert pipe.input_lipschitz() == (pytest.approx(1.0), "exact")
    rows = pipe.projection.components_.copy()
    # rows orthonormal only to 1e-10 (what a loaded file may hold): L from the matrix; still within
    # the shave, so 'exact' stays, but every radius is divided by L
    pipe.projection.components_ = rows * (1 + 1e-10)
    L, kind = pipe.input_lipschitz()
    assert L >= 1 + 1e-10 and kind == "exact"
    after = pipe.certify(X[1000:1010])
    assert all(0 < c.radius <= c.latent_radius / L for c in after if c.latent_radius > 0)
    # beyond the shave: a sound bound, no longer 'exact'
    pipe.projection.components_ = rows * (1 + 1e-8)
    L, kind = pipe.input_lipschitz()
    assert L >= 1 + 1e-8 and kind == "bound"
    assert {c.radius_kind for c in pipe.certify(X[1000:1010])} == {"bound"}


def test_projection_rounding_bound_holds(digits):
    images, labels = digits
    X = images.numpy().reshape(len(images), -1).astype(np.float64) * 1e3 + 5.0  # large values, cancellation
    pipe = Pipeline(encoder="none", n_components=16).fit(X[:1000], labels[:1000])
    pca = pipe.projection
    got = pca.transform(X[1000:1100])
    exact = (X[1000:1100].astype(np.longdouble) - pca.mean_.astype(np.longdouble)) @ \
        pca.components_.T.astype(np.longdouble)
    err = np.linalg.norm((got - exact).astype(np.float64), axis=1)
    bound = pca.transform_error(X[1000:1100])
    assert np.all(err <= bound) and np.all(bound < 1e-9)


def test_near_boundary_float32_inputs_get_no_wrong_certificate(digits):
    """Inputs bisected onto the decision boundary to float precision: a positive sound radius is only
    given to the class that the float64 pipeline predicts there (the old path, float32 latents taken
    as exact, certifies the wrong class on some of them)."""
    images, labels = digits
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(128, 32)).eval()
    pipe = Pipeline(encoder=encoder, projection="none",
                    head=GaussianMixtureClassifier(covariance_type="tied", reg_covar=1e-3))
    pipe.fit(images[:1000].numpy(), labels[:1000])
    module = _float64_module(pipe)

    def predict64(x):
        with torch.no_grad():
            return module(torch.as_tensor(x, dtype=torch.float64)).argmax(1).numpy()

    a, b = images[1000:1150].double(), images[1150:1300].double()
    ca, cb = predict64(a), predict64(b)
    a, b = a[ca != cb], b[ca != cb]
    for _ in range(60):  # bisect in float64 onto the boundary between a's and b's classes
        mid = (a + b) / 2
        same = torch.as_tensor(predict64(mid) == predict64(a))
        a = torch.where(same.view(-1, 1, 1, 1), mid, a)
        b = torch.where(same.view(-1, 1, 1, 1), b, mid)
    X = torch.cat([a, b]).float().numpy()
    truth = pipe.head.classes_[predict64(X)]
    certs = pipe.certify(X)
    wrong = [c for c, t in zip(certs, truth) if c.radius > 0 and c.prediction != t]
    assert not wrong, f"{len(wrong)} certificates for a class the float64 pipeline does not predict"
    old_pred, old_radius = pipe.head.certify(pipe.latents(X))
    assert np.sum((old_radius > 0) & (old_pred != truth)) > 0  # the check would catch the old path


def test_certified_pass_hits_the_latent_cache(tmp_path, digits, monkeypatch):
    """`gmcert certify` after `gmcert fit` reuses the certifying pass (latents and error bound)."""
    from gmcert.bounds import rounding

    card = tmp_path / "tiny.toml"
    card.write_text('name = "tiny"\narchitecture = "tf_efficientnet_lite0"\ninput_size = [3, 16, 16]\n'
                    'mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\ninterpolation = "bilinear"\nfeature_dim = 1280\n')
    images, labels = digits
    X = images[:60].expand(-1, 3, -1, -1).numpy()
    pipe = Pipeline(encoder=str(card), pretrained=False, n_components=8, cache_dir=tmp_path / "cache")
    pipe.fit(X, labels[:60], dataset_identity="digits[:60]")
    calls = []
    original = rounding.ForwardErrorBound.prepare  # every pass, plain or over balls, starts here
    monkeypatch.setattr(rounding.ForwardErrorBound, "prepare", lambda self, *a, **k: calls.append(1) or
                        original(self, *a, **k))
    first = pipe.certify(X[:20], dataset_identity="digits[:20]")
    second = pipe.certify(X[:20], dataset_identity="digits[:20]")
    assert len(calls) == 1
    assert [(c.prediction, c.radius, c.extra["latent_error"]) for c in first] == \
        [(c.prediction, c.radius, c.extra["latent_error"]) for c in second]
    pipe.certify(X[:20])  # no identity, no cache
    assert len(calls) == 2

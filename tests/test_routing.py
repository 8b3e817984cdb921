"""The routed classifier h (gmcert.hybrid): its deployed predict never answers another class inside
a reported radius, on a raw-pixel pipeline and on a toy-encoder pipeline."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from gmcert.data import Resize, load_dataset
from gmcert.hybrid import (FallbackPolicy, HybridClassifier, certify_hybrid, choose_route_threshold, hybrid_radius,
                           routed_certificate)
from gmcert.latent.mixture import GaussianMixtureClassifier
from gmcert.pipeline import Pipeline
from gmcert.results import ABSTAIN, Certificate

SIGMA, TARGET = 0.25, 0.3


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", channels=None)
    return data.images.numpy(), data.labels


def _raw(digits):
    X, y = digits
    return Pipeline(encoder="identity", n_components=24).fit(X[:1200], y[:1200], noise_sigma=SIGMA, random_state=0)


def _toy(digits):
    """Nearest resize 8 -> 16 (L = 2), then an orthonormal linear map."""
    X, y = digits
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(256, 24, generator=gen, dtype=torch.float64))
    linear = nn.Linear(256, 24, bias=False)
    linear.weight.data = q.T.float().contiguous()
    encoder = nn.Sequential(Resize((16, 16), "nearest"), nn.Flatten(), linear).eval()
    head = GaussianMixtureClassifier(covariance_type="full", shrinkage="ledoit_wolf")
    return Pipeline(encoder=encoder, projection="none", head=head).fit(X[:1200], y[:1200])


def _route_attack(pipeline, x, radius, direction_sign, steps=30, seed=0):
    """Points inside the ball that push the closed-form radius down (direction_sign=-1) or up (+1),
    along the head's score margin in the float64 module, plus random points on the sphere."""
    module = copy.deepcopy(pipeline.torch_module(dtype=torch.float64)).double()  # never the pipeline's own
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float64)[None]
    points = [x + radius * u / u.norm() for u in torch.randn((6, *x.shape[1:]), generator=gen, dtype=torch.float64)]
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        scores = module(x + delta)
        top2 = scores.topk(2, dim=1).values
        (grad,) = torch.autograd.grad((top2[:, 0] - top2[:, 1]).sum(), delta)
        with torch.no_grad():
            delta = delta + direction_sign * 0.15 * radius * grad / grad.norm().clamp_min(1e-30)
            delta = delta * min(1.0, radius / float(delta.norm().clamp_min(1e-30)))
            points.append(x + delta)
    return torch.cat(points).numpy()


@pytest.mark.parametrize("build, tau", [(_raw, TARGET), (_toy, 0.05)], ids=["raw-pixels", "toy-encoder"])
def test_deployed_predict_never_flips_inside_a_reported_radius(digits, build, tau):
    X, y = digits
    pipeline = build(digits)
    policy = FallbackPolicy(target_radius=TARGET, route_threshold=tau, sigma=SIGMA, alpha=0.001,
                            max_samples=4000, predict_n=2000)
    X_test = X[1300:1330]
    certs = certify_hybrid(pipeline, X_test, policy)
    routes = [c.extra["route"] for c in certs]
    assert "closed_form" in routes and "smoothing" in routes + ["band"] and len(set(routes)) >= 2
    h = HybridClassifier(pipeline, policy)
    assert np.array_equal(h.predict(X_test)[[r == "closed_form" for r in routes]],
                          [c.prediction for c, r in zip(certs, routes) if r == "closed_form"])
    checked = 0
    for i, cert in enumerate(certs):
        if cert.prediction == ABSTAIN or cert.radius <= 0:
            continue
        for sign in (-1.0, 1.0):
            points = _route_attack(pipeline, X_test[i], cert.radius * 0.999, sign, seed=i)
            answers = h.predict(points, seed=1000 + i)
            assert set(answers.tolist()) <= {cert.prediction, ABSTAIN}, (i, cert.extra["route"], answers)
            checked += len(points)
    assert checked > 500


def test_closed_form_rows_lose_the_threshold(digits):
    """Just past ``lo - tau`` an input can leave the closed form: the old radius (all of lo) was
    not a radius of h."""
    X, _ = digits
    pipeline = _raw(digits)
    policy = FallbackPolicy(target_radius=TARGET, route_threshold=TARGET, sigma=SIGMA)
    closed = pipeline.certify(X[1300:1400])
    left = 0
    for i, c in enumerate(closed):
        if policy.route(c) != "closed_form" or c.radius > 1.5:
            continue
        # the head's minimiser direction in pixels (identity + PCA: lift the latent direction back)
        z = pipeline.latents(X[1300 + i:1301 + i])
        _, _, u = pipeline.head.certify(z, return_direction=True)
        step = (pipeline.projection.components_.T @ u[0]).reshape(X.shape[1:])
        x_far = X[1300 + i] + step * (c.radius - policy.route_threshold) * 1.2
        left += policy.route(pipeline.certify(x_far[None])[0]) != "closed_form"
    assert left > 0


def test_hybrid_radius_formula():
    """The smoothing route's radius (module docstring), on hand-made certificates."""
    policy = FallbackPolicy(target_radius=0.5, route_threshold=0.5)
    closed = Certificate(3, 0.1, "exact", "closed_form", extra={"covers_predict": True, "radius_upper": 0.1})
    agree = Certificate(3, 2.0, "probabilistic", "smoothing")
    disagree = Certificate(4, 2.0, "probabilistic", "smoothing")
    assert hybrid_radius(policy, [3, 4, 5], closed, agree) == pytest.approx(0.5)  # min(r_g, tau)
    assert hybrid_radius(policy, [3, 4, 5], closed, disagree) == pytest.approx(0.4)  # tau - hi
    zero = Certificate(3, 0.0, "bound", "closed_form", extra={"covers_predict": True, "radius_upper": 0.2})
    assert hybrid_radius(policy, [3, 4], zero, agree) == pytest.approx(0.3)  # exact f unknown at x
    kl = {3: 0.1, 4: 9.0}  # class 4 never takes the closed form: nothing can route there
    strict = FallbackPolicy(target_radius=0.5, route_threshold=0.5, mismatch_threshold=1.0, kl_per_class=kl)
    assert hybrid_radius(strict, [3, 4], closed, agree) == pytest.approx(2.0)
    assert hybrid_radius(policy, [3, 4], closed, Certificate(ABSTAIN, 0.0, "probabilistic", "smoothing")) == 0.0


def test_band_answers_only_where_f_is_sure_and_agrees():
    """Where the arithmetic cannot tell the route (lo <= tau <= hi), h answers only a class that
    the exact f holds at x (lo > 0) and g agrees with."""
    policy = FallbackPolicy(target_radius=0.3, route_threshold=0.3)
    g = Certificate(3, 1.0, "probabilistic", "smoothing")
    unsure = Certificate(3, 0.0, "bound", "closed_form", extra={"covers_predict": True, "radius_upper": 0.5})
    assert policy.route(unsure) == "band" and routed_certificate(policy, [3, 4], unsure, g).prediction == ABSTAIN
    sure = Certificate(3, 0.2, "bound", "closed_form", extra={"covers_predict": True, "radius_upper": 0.4})
    cert = routed_certificate(policy, [3, 4], sure, g)
    assert policy.route(sure) == "band" and cert.prediction == 3 and cert.radius == pytest.approx(0.3)
    other = Certificate(4, 1.0, "probabilistic", "smoothing")
    assert routed_certificate(policy, [3, 4], sure, other).prediction == ABSTAIN
    above = Certificate(3, 0.5, "exact", "closed_form", extra={"covers_predict": True, "radius_upper": 0.5})
    cert = routed_certificate(policy, [3, 4], above)
    assert cert.path == "closed_form" and cert.radius == pytest.approx(0.2) and cert.radius_kind == "bound"


def test_threshold_is_chosen_on_calibration_data(digits):
    """The chosen tau has the best certified accuracy of h at the target among the candidates,
    measured by certifying h itself with each (same seeds)."""
    X, y = digits
    pipeline = _raw(digits)
    policy = FallbackPolicy(target_radius=TARGET, sigma=SIGMA, alpha=0.01, max_samples=1000)
    candidates = [0.0, TARGET, 2 * TARGET]
    X_cal, y_cal = X[1200:1240], y[1200:1240]
    tau = choose_route_threshold(pipeline, X_cal, y_cal, policy, candidates=candidates)
    accuracy = {}
    for t in candidates:
        trial = FallbackPolicy(target_radius=TARGET, sigma=SIGMA, alpha=0.01, max_samples=1000, route_threshold=t)
        certs = certify_hybrid(pipeline, X_cal, trial)
        accuracy[t] = np.mean([c.prediction == label and c.radius >= TARGET for c, label in zip(certs, y_cal)])
    assert accuracy[tau] == max(accuracy.values()), (tau, accuracy)
    assert len(set(accuracy.values())) > 1  # the choice matters on this data


def test_certify_command_calibrates_the_threshold(tmp_path, capsys):
    from gmcert.cli import main

    model = tmp_path / "model"
    assert main(["fit", "--encoder", "identity", "--dim", "16", "--out", str(model), "--cache-dir", ""]) == 0
    out = tmp_path / "h.tsv"
    assert main(["certify", "--model", str(model), "--out", str(out), "--limit", "6", "--fallback", "smoothing",
                 "--target-radius", "0.3", "--calibrate", "12", "--max-samples", "300", "--alpha", "0.01",
                 "--cache-dir", ""]) == 0
    assert "route threshold tau" in capsys.readouterr().err
    import json

    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["fallback_policy"]["route_threshold"] is not None and sum(summary["rows_by_path"].values()) == 6

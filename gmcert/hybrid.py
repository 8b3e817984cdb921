"""Hybrid certification: the closed form where it serves, randomized smoothing elsewhere, and a
certificate for the routed classifier that is actually deployed (BRIEF section 11).

The classifiers. ``f`` is the pipeline (encoder, projection, mixture head) in exact arithmetic; ``g``
its Gaussian smoothing. ``rho(x) = R(z(x)) / L`` with ``z(x)`` the exact latent, ``R`` the exact
latent distance to the head's decision boundary and ``L`` the input Lipschitz bound: ``rho`` is
1-Lipschitz in x, and ``rho(x') <= ||x' - x||`` whenever ``f(x') != f(x)`` (``rho`` lower-bounds the
distance to f's boundary). gmcert computes an interval ``lo(x) <= rho(x) <= hi(x)`` (the
certificate's radius and ``extra["radius_upper"]``, rounding of the encoder included). Each class
k has a threshold ``tau_k``: ``tau`` (``route_threshold``), or infinity when the class's estimated
mismatch exceeds ``mismatch_threshold``. The deployed classifier is, with ``c = f(x)``:

    h(x) = f(x)  if lo(x) >  tau_c                       (route closed_form)
           g(x)  if hi(x) <  tau_c                       (route smoothing)
           f(x)  if f(x) = g(x) and lo(x) > 0, else abstain, otherwise
                 (route band: the arithmetic cannot tell which side of tau_c rho lies)

Here f(x) is the computed class: :meth:`gmcert.pipeline.Pipeline.predict`'s (the certified
arithmetic and the head's exact decision). The routes below look up tau at x' by the class x'
computes, so each claim needs that class to be c wherever ``||x' - x|| < lo(x)``, also next to a
class whose tau is infinite (x' computing that class would go to smoothing). That is a checked
condition, not a rounding assumption: ``lo`` is shaved by the pass's rounding over the whole ball
(:mod:`gmcert.bounds.ball_rounding`), so inside it the computed class is c, and a certificate
without that shave (``extra["covers_predict"]`` unset) gets ``lo = 0``. Where ``lo(x) > 0`` f(x) is
the exact f's class too.

Claim: for ``||x' - x|| < r`` with r below, ``h(x')`` is ``h(x)`` or an abstention, never another
class (the smoothing parts with probability 1 - alpha, as ``g``'s own certificate).

* closed_form, ``r = lo(x) - tau_c``: ``r <= lo(x)`` keeps ``f(x') = c``, and
  ``rho(x') >= rho(x) - r >= tau_c``, so ``hi(x') >= tau_c``: x' takes the closed form or the band,
  and either answers f(x') = c only where ``lo(x') > 0``, else abstains.
* smoothing (and band, where f and g agree), with ``c_g = g(x)`` and g's radius ``r_g``:
  ``r = min(r_g, min_{k != c_g} s_k)``, where ``s_k`` is a distance within which no x' can take the
  closed form with ``f(x') = k``: that needs ``rho(x') >= lo(x') > tau_k``. Always
  ``s_k = tau_k - hi(x)`` (``rho(x') <= rho(x) + ||x' - x||``). When ``lo(x) > 0`` (so the exact f
  says c at x) and ``k != c``: ``f(x') = k`` needs ``||x' - x|| >= lo(x)``, and then
  ``rho(x') <= ||x' - x||``, so ``s_k = max(lo(x), tau_k)``. Inside r, x' takes the smoothing route
  (``g(x') = c_g``), the band (``c_g`` or abstain, since the band answers only when f and g agree),
  or the closed form with ``f(x') = c_g``. With one threshold this gives ``min(r_g, tau)`` when f
  and g agree (tighter than the ``max(R, tau - R)`` of BRIEF section 11) and ``min(r_g, tau - R)``
  when they do not. A band row that answers c is also held by ``min(r_g, lo(x))`` (inside it f and
  g both say c, whatever the route); it keeps the larger of the two.

Smoothing runs the pipeline in float32 and certifies that classifier as implemented: its samples
are evaluations of the deployed g's base classifier. The closed form's lo and hi cover the
encoder's rounding (:meth:`gmcert.pipeline.Pipeline.certify`).

``tau`` is chosen to maximise the certified accuracy of h at the target radius on calibration
inputs that are not certified (:func:`choose_route_threshold`); without them it is the target.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gmcert.errors import DataError
from gmcert.results import ABSTAIN, SOUND_KINDS, Certificate

FORCE_CHOICES = ("auto", "closed_form", "smoothing")


@dataclass
class FallbackPolicy:
    """How the hybrid classifier routes, and how its smoother runs.

    Parameters
    ----------
    target_radius : float, optional
        Input-space radius each input needs: the smoother stops once it is certified or out of
        reach, and the default routing threshold. None: the smoother runs in radius mode.
    route_threshold : float, optional
        ``tau``: the closed form serves an input when its sound input radius exceeds tau.
        Default: ``target_radius`` (or 0), unless :func:`choose_route_threshold` sets it.
    mismatch_threshold : float, optional
        Classes whose ``kl_per_class`` exceeds it never take the closed form (their tau is inf).
    kl_per_class : dict, optional
        ``label -> estimated KL`` (from ``gmcert.mismatch.divergence``); required with ``mismatch_threshold``.
    sigma, alpha, max_samples, seed : smoother settings (pixel-space noise level, failure
        probability per input, evaluation budget per input, generator seed).
    predict_n : int, default 1000
        Draws of Cohen's PREDICT when :meth:`HybridClassifier.predict` evaluates g.
    force : {"auto", "closed_form", "smoothing"}, default "auto"
        Every input down one path: tau = 0 (h = f) or tau = inf (h = g).
    """

    target_radius: float | None = None
    mismatch_threshold: float | None = None
    kl_per_class: dict | None = None
    sigma: float = 0.25
    alpha: float = 0.001
    max_samples: int = 100_000
    seed: int = 0
    force: str = "auto"
    route_threshold: float | None = None
    predict_n: int = 1000

    def __post_init__(self):
        if self.force not in FORCE_CHOICES:
            raise DataError(f"force must be one of {FORCE_CHOICES}, got {self.force!r}")
        if self.mismatch_threshold is not None and self.kl_per_class is None:
            raise DataError("mismatch_threshold needs kl_per_class: run `gmcert diagnose` on the model first")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise DataError(f"sigma must be a positive number, got {self.sigma}")
        if self.target_radius is not None and not self.target_radius >= 0:
            raise DataError(f"target_radius must be >= 0, got {self.target_radius}")
        if not 0 < self.alpha < 1:
            raise DataError(f"alpha must be in (0, 1), got {self.alpha}")
        if int(self.max_samples) < 1 or int(self.predict_n) < 1:
            raise DataError(f"max_samples and predict_n must be >= 1, got {self.max_samples}, {self.predict_n}")
        if self.route_threshold is not None and not self.route_threshold >= 0:
            raise DataError(f"route_threshold must be >= 0, got {self.route_threshold}")

    def threshold(self, label) -> float:
        """``tau_k`` of class ``label``."""
        if self.force != "auto":
            return 0.0 if self.force == "closed_form" else math.inf
        if self.mismatch_threshold is not None and self.kl_per_class.get(label, math.inf) > self.mismatch_threshold:
            return math.inf
        if self.route_threshold is not None:
            return float(self.route_threshold)
        return float(self.target_radius or 0.0)

    def route(self, cert) -> str:
        """``closed_form``, ``smoothing`` or ``band`` for a closed-form Certificate (see the module)."""
        lo, hi = _interval(cert)
        tau = self.threshold(cert.prediction)
        if lo > tau:
            return "closed_form"
        return "smoothing" if hi < tau else "band"


def _interval(cert) -> tuple:
    """``(lo, hi)`` around rho for a closed-form certificate; an unsound kind says nothing, and
    and a radius that does not cover the deployed arithmetic (``extra["covers_predict"]``, set by
    :meth:`gmcert.pipeline.Pipeline.certify`) gives lo = 0: the routes need the class that x'
    computes to be c inside lo(x), not only the exact function's class."""
    if cert.radius_kind not in SOUND_KINDS or cert.prediction == ABSTAIN:
        return 0.0, math.inf
    hi = cert.extra.get("radius_upper", math.inf)  # about the exact function: no shave needed
    return (cert.radius if cert.extra.get("covers_predict") else 0.0), hi


def hybrid_radius(policy, classes, closed, smooth) -> float:
    """h's certified radius at an input that took the smoothing route or the band (module docstring).

    ``closed``: the closed-form Certificate; ``smooth``: g's (prediction = a label, or ABSTAIN).
    """
    if smooth.prediction == ABSTAIN:
        return 0.0
    lo, hi = _interval(closed)
    reach = math.inf
    for k in classes:
        if k == smooth.prediction:
            continue
        tau = policy.threshold(k)
        s = tau - hi
        if lo > 0 and k != closed.prediction:
            s = max(s, lo, tau)
        reach = min(reach, s)
    return max(0.0, min(smooth.radius, reach))


def load_kl_per_class(model_dir) -> dict | None:
    """``label -> KL`` from the ``mismatch.json`` that ``gmcert diagnose`` saved in the model, if any."""
    path = Path(model_dir) / "mismatch.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        return {int(label): float(kl) for label, kl in zip(report["classes"], report["kl_per_class"], strict=True)}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: unreadable mismatch report ({err}); rerun `gmcert diagnose`") from err


def certify_hybrid(pipeline, X, policy: FallbackPolicy, method: str = "exact", lipschitz: str = "auto",
                   dataset_identity=None, seeds=None):
    """Certificates of the routed classifier h for ``X`` (see the module docstring)."""
    return list(iter_certify_hybrid(pipeline, X, policy, method, lipschitz, dataset_identity, seeds))


def iter_certify_hybrid(pipeline, X, policy: FallbackPolicy, method: str = "exact", lipschitz: str = "auto",
                        dataset_identity=None, seeds=None):
    """Yield one Certificate of h per input of ``X``, in order, as each is settled.

    The closed form runs on all of ``X`` at once (one encoder pass); smoothing then runs input by
    input, its generator reseeded from ``seeds[i]`` (default ``policy.seed + i``), so a resumed run
    reproduces the rows of an uninterrupted one. ``extra["route"]`` says which route served the row;
    routes use the sound closed-form radius whatever ``lipschitz`` asks for (an estimate is not a
    certificate, so it cannot decide a route).
    """
    certs = pipeline.certify(X, method=method, dataset_identity=dataset_identity)
    classes = [int(c) for c in pipeline.head.classes_]
    smoother = None
    for i, closed in enumerate(certs):
        smooth = None
        if policy.route(closed) != "closed_form":
            smoother = smoother or pipeline.smoother(policy.sigma, policy.seed)
            smooth = _smooth_certificate(pipeline, smoother, X[i], policy, int(seeds[i] if seeds is not None else i))
        yield routed_certificate(policy, classes, closed, smooth)


def band_answers(closed, g_prediction) -> bool:
    """In the band, h answers only where the exact f is sure of its class (lo > 0) and g agrees."""
    return g_prediction == closed.prediction and closed.radius > 0


def routed_certificate(policy, classes, closed, smooth=None) -> Certificate:
    """h's Certificate from f's closed-form one and, off the closed-form route, g's (module docstring)."""
    route = policy.route(closed)
    tau = policy.threshold(closed.prediction)
    if route == "closed_form":
        # h differs from f somewhere unless every threshold is 0: a sound radius, not h's exact one
        exact_h = policy.force == "closed_form" or (tau == 0 and policy.mismatch_threshold is None)
        return Certificate(closed.prediction, max(0.0, closed.radius - tau),
                           closed.radius_kind if exact_h else "bound", "closed_form", closed.samples,
                           closed.stop_reason, closed.latent_radius, closed.time,
                           {**closed.extra, "route": route, "route_threshold": tau})
    prediction, radius = smooth.prediction, hybrid_radius(policy, classes, closed, smooth)
    if route == "band" and not band_answers(closed, prediction):
        prediction, radius = ABSTAIN, 0.0  # h abstains where it cannot tell its route
    elif route == "band":
        radius = max(radius, min(smooth.radius, closed.radius))  # f and g both say c within the latter
    return Certificate(prediction, radius, "probabilistic", route, smooth.samples, smooth.stop_reason,
                       time=smooth.time + closed.time,
                       extra={**smooth.extra, "route": route, "route_threshold": tau,
                              "smoothed_radius": smooth.radius, "closed_form_prediction": closed.prediction,
                              "closed_form_radius": closed.radius})


def _smooth_certificate(pipeline, smoother, x, policy, seed):
    import torch

    from gmcert.smoothing.smoother import HeadPrior

    smoother.reseed(policy.seed + seed)
    start = time.perf_counter()
    cert = smoother.certify_sequential(
        torch.as_tensor(np.asarray(x), dtype=torch.float32), alpha=policy.alpha,
        target_radius=policy.target_radius or None, max_samples=policy.max_samples,
        max_radius=None if policy.target_radius else 4 * policy.sigma, prior=HeadPrior())
    cert.time = time.perf_counter() - start
    return pipeline.label_smoothed(cert)


class HybridClassifier:
    """The deployed routed classifier h: :meth:`predict` computes exactly what the certificates
    of :func:`certify_hybrid` are about (module docstring), g by Cohen's PREDICT.

    Parameters
    ----------
    pipeline : gmcert.pipeline.Pipeline
        Fitted.
    policy : FallbackPolicy
    """

    def __init__(self, pipeline, policy: FallbackPolicy):
        self.pipeline = pipeline
        self.policy = policy

    def predict(self, X, seed: int = 0) -> np.ndarray:
        """Labels ``(n,)``, ``ABSTAIN`` (-1) where g abstains or the band's routes disagree."""
        certs = self.pipeline.certify(X)
        out = np.empty(len(certs), dtype=np.int64)
        smoother = None
        for i, closed in enumerate(certs):
            route = self.policy.route(closed)
            if route == "closed_form":
                out[i] = closed.prediction
                continue
            smoother = smoother or self.pipeline.smoother(self.policy.sigma, seed)
            smoother.reseed(seed + i)
            import torch

            g = self.pipeline.label_smoothed(smoother.predict(torch.as_tensor(np.asarray(X[i]), dtype=torch.float32),
                                                              n=self.policy.predict_n, alpha=self.policy.alpha))
            out[i] = g.prediction if route == "smoothing" or band_answers(closed, g.prediction) else ABSTAIN
        return out

    def certify(self, X, **kwargs):
        return certify_hybrid(self.pipeline, X, self.policy, **kwargs)


def choose_route_threshold(pipeline, X_cal, y_cal, policy: FallbackPolicy, candidates=None) -> float:
    """The tau that maximises h's certified accuracy at ``policy.target_radius`` on calibration data.

    ``X_cal`` must be disjoint from the inputs later certified (tau is then fixed before their
    draws, so their certificates keep their level). Every calibration input is certified in closed
    form and by the smoother; each candidate tau (0, the target and multiples of it, and the
    points ``lo_i - target`` where an input's closed-form certificate starts or stops counting) is
    scored with :func:`hybrid_radius`. Ties go to the smallest tau (fewest smoothing runs).
    """
    target = float(policy.target_radius or 0.0)
    closed = pipeline.certify(X_cal)
    smoother = pipeline.smoother(policy.sigma, policy.seed)
    smooth = [_smooth_certificate(pipeline, smoother, x, policy, i) for i, x in enumerate(X_cal)]
    los = np.array([_interval(c)[0] for c in closed])
    if candidates is None:
        candidates = np.unique(np.r_[0.0, target * np.array([0.5, 1, 1.5, 2, 3]), np.maximum(los - target, 0.0)])
    classes = [int(c) for c in pipeline.head.classes_]
    best, best_score = 0.0, -1
    for tau in sorted(float(t) for t in candidates):
        trial = FallbackPolicy(**{**policy.__dict__, "route_threshold": tau, "force": "auto"})
        certs = [routed_certificate(trial, classes, c, g) for c, g in zip(closed, smooth)]
        score = sum(c.prediction == label and c.radius >= target for c, label in zip(certs, y_cal))
        if score > best_score:
            best, best_score = tau, score
    return best


def iter_certify_smoothing(pipeline, X, sigma: float, alpha: float, n0: int, n: int, seed: int = 0, seeds=None,
                           serialized: dict | None = None):
    """Yield Cohen's CERTIFY (fixed n) of the pipeline's smoothed classifier for each input of ``X``,
    with no closed form: for encoders it cannot serve (deep equilibrium models).

    ``serialized``: keyword arguments of :meth:`Smoother.certify_serialized` (``steps``,
    ``warmup_interval``, ``audit_size``, ``verify``) to draw the counted samples by serialized
    smoothing; the classifier certified is still the standard DEQ's. Each input's generator is reseeded from
    ``seed + seeds[i]`` (default ``seed + i``), so a resumed run reproduces an uninterrupted one.
    """
    import torch

    smoother = pipeline.smoother(sigma, seed)
    for i, x in enumerate(X):
        smoother.reseed(seed + int(seeds[i] if seeds is not None else i))
        image = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        cert = smoother.certify_serialized(image, n0, n, alpha, **serialized) if serialized is not None \
            else smoother.certify(image, n0, n, alpha)
        yield pipeline.label_smoothed(cert)

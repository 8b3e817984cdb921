"""Hybrid certification: the closed form first, randomized smoothing where it cannot serve.

An input goes to the smoother when
  * its closed-form radius is not of a sound kind, or is below the radius the caller needs, or
  * the mismatch (estimated KL to its Gaussian, ``gmcert diagnose``) of its predicted class
    exceeds a threshold, so the mixture assumption behind the closed form is in doubt.
Each result says which path certified it (``closed_form`` or ``smoothing``) and its radius kind.
Smoothing certifies the smoothed pipeline ``g`` (a different classifier from the GM head, with
its own prediction), at failure probability ``alpha`` per input.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gmcert.errors import DataError
from gmcert.results import ABSTAIN, SOUND_KINDS

FORCE_CHOICES = ("auto", "closed_form", "smoothing")


@dataclass
class FallbackPolicy:
    """When and how to fall back to randomized smoothing.

    Parameters
    ----------
    target_radius : float, optional
        Input-space radius each input needs. Closed-form certificates below it fall back, and the
        sequential smoother stops as soon as it is certified or out of reach. None: the closed
        form serves whenever its radius is sound and positive.
    mismatch_threshold : float, optional
        Fall back when ``kl_per_class[predicted class]`` exceeds it.
    kl_per_class : dict, optional
        ``label -> estimated KL`` (from ``gmcert.mismatch``); required with ``mismatch_threshold``.
    sigma, alpha, max_samples, seed : smoother settings (pixel-space noise level, failure
        probability per input, evaluation budget per input, generator seed).
    force : {"auto", "closed_form", "smoothing"}, default "auto"
        Send every input down one path (for comparisons and tests).
    """

    target_radius: float | None = None
    mismatch_threshold: float | None = None
    kl_per_class: dict | None = None
    sigma: float = 0.25
    alpha: float = 0.001
    max_samples: int = 100_000
    seed: int = 0
    force: str = "auto"

    def __post_init__(self):
        if self.force not in FORCE_CHOICES:
            raise DataError(f"force must be one of {FORCE_CHOICES}, got {self.force!r}")
        if self.mismatch_threshold is not None and self.kl_per_class is None:
            raise DataError("mismatch_threshold needs kl_per_class: run `gmcert diagnose` on the model first")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise DataError(f"sigma must be a positive number, got {self.sigma}")
        if self.target_radius is not None and not self.target_radius >= 0:
            raise DataError(f"target_radius must be >= 0, got {self.target_radius}")

    def needs_smoothing(self, cert) -> bool:
        """True when ``cert`` (a closed-form Certificate) must go to the smoother."""
        if self.force != "auto":
            return self.force == "smoothing"
        if cert.radius_kind not in SOUND_KINDS or cert.prediction == ABSTAIN:
            return True
        needed = self.target_radius if self.target_radius is not None else 0.0
        if not cert.radius > needed:
            return True
        if self.mismatch_threshold is not None:
            return self.kl_per_class.get(cert.prediction, math.inf) > self.mismatch_threshold
        return False


def load_kl_per_class(model_dir) -> dict | None:
    """``label -> KL`` from the ``mismatch.json`` that ``gmcert diagnose`` saved in the model, if any."""
    path = Path(model_dir) / "mismatch.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return {int(label): float(kl) for label, kl in zip(report["classes"], report["kl_per_class"])}


def certify_hybrid(pipeline, X, policy: FallbackPolicy, method: str = "exact", lipschitz: str = "auto",
                   dataset_identity=None, seeds=None):
    """Certificates for ``X``: closed form where the policy allows, sequential smoothing elsewhere."""
    return list(iter_certify_hybrid(pipeline, X, policy, method, lipschitz, dataset_identity, seeds))


def iter_certify_hybrid(pipeline, X, policy: FallbackPolicy, method: str = "exact", lipschitz: str = "auto",
                        dataset_identity=None, seeds=None):
    """Yield one Certificate per input of ``X``, in order, as each is settled.

    The closed form runs on all of ``X`` at once (one encoder pass); smoothing then runs input by
    input, its generator reseeded from ``seeds[i]`` (default ``policy.seed + i``), so a resumed run
    reproduces the rows of an uninterrupted one.
    """
    import torch

    from gmcert.smoothing import HeadPrior

    certs = pipeline.certify(X, method=method, lipschitz=lipschitz, dataset_identity=dataset_identity)
    smoother = None
    for i, cert in enumerate(certs):
        if policy.needs_smoothing(cert):
            smoother = smoother or pipeline.smoother(policy.sigma, policy.seed)
            smoother.reseed(policy.seed + int(seeds[i] if seeds is not None else i))
            start = time.perf_counter()
            cert = smoother.certify_sequential(
                torch.as_tensor(np.asarray(X[i]), dtype=torch.float32), alpha=policy.alpha,
                target_radius=policy.target_radius, max_samples=policy.max_samples,
                max_radius=None if policy.target_radius else 4 * policy.sigma, prior=HeadPrior())
            cert = pipeline.label_smoothed(cert)
            cert.time = time.perf_counter() - start
        yield cert


"""Encoder + projection + Gaussian-mixture head as one object, saved as one model directory.

Pixels (or latents) in, certified predictions out. The closed-form latent radius becomes an
input radius through the encoder's Lipschitz constant, and every radius says its kind
(BRIEF §4). ``gmcert.hybrid`` adds the smoothing fallback on top of this.

Encoders:
  ``none``      inputs already are latents ``(n, d)`` (``gmcert fit --latents``); input radius = latent radius.
  ``identity``  raw pixels ``(n, C, H, W)`` flattened; with PCA the map is orthonormal, so radii stay exact.
  card name     a pretrained encoder card (``efficientnet_lite0``, ``timm:<name>``, a ``.toml`` path).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from gmcert.errors import DataError, ModelFileError
from gmcert.mixture import GaussianMixtureClassifier
from gmcert.results import ABSTAIN, Certificate

FORMAT = "gmcert-pipeline"
FORMAT_VERSION = 1
LINEAR_ENCODERS = ("none", "identity")
LIPSCHITZ_MODES = ("auto", "bound", "estimate")


def default_head() -> GaussianMixtureClassifier:
    """Full covariances with Ledoit-Wolf shrinkage: d is comparable to the class sizes on small data."""
    return GaussianMixtureClassifier(covariance_type="full", shrinkage="ledoit_wolf")


class Pipeline:
    """Encoder -> projection -> Gaussian-mixture head.

    Parameters
    ----------
    encoder : str, default "efficientnet_lite0"
        ``none``, ``identity``, an encoder card name or path, or ``timm:<model>``.
    projection : {"pca", "none"}, default "pca"
    n_components : int, default 64
        PCA output dimension (ignored for ``projection="none"``).
    head : GaussianMixtureClassifier, optional
        Unfitted head; default full covariance with Ledoit-Wolf shrinkage.
    pretrained : bool, default True
        False gives a randomly initialised encoder (tests only).
    batch_size : int, default 64
    device : str, optional
        Default CUDA when available, else CPU.
    cache_dir : path, optional
        Latent cache directory (keyed on card, weights hash, dataset, transform).
    """

    def __init__(self, encoder="efficientnet_lite0", projection="pca", n_components=64, head=None,
                 pretrained=True, batch_size=64, device=None, cache_dir=None):
        self.encoder_name = encoder
        self.projection_kind = projection
        self.n_components = n_components
        self.head = head if head is not None else default_head()
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = cache_dir
        self.projection = None
        self.lipschitz_ = None  # (L, kind) of encoder + projection, computed once
        self.metadata = {}
        self._encoder = None

    # -- latents ---------------------------------------------------------------------------
    @property
    def encoder(self):
        """The torch module pixels -> raw latents (built on first use)."""
        if self._encoder is None:
            import torch

            if self.encoder_name == "none":
                self._encoder = torch.nn.Identity()
            elif self.encoder_name == "identity":
                self._encoder = torch.nn.Flatten()
            else:
                from gmcert.encoders import load_encoder

                self._encoder = load_encoder(self.encoder_name, pretrained=self.pretrained, device=self.device)
        return self._encoder

    def raw_latents(self, X, dataset_identity: str | None = None) -> np.ndarray:
        """Encoder outputs ``(n, D)`` float64, before projection."""
        if self.encoder_name == "none":
            X = np.asarray(X, dtype=np.float64)
            if X.ndim != 2:
                raise DataError(f"latent inputs must have shape (n, d), got {X.shape}")
            return X
        if self.encoder_name == "identity":
            X = np.asarray(X, dtype=np.float64)
            if X.ndim != 4:
                raise DataError(f"images must have shape (N, C, H, W), got {X.shape}")
            return X.reshape(len(X), -1)
        from gmcert.encoding import encode, latent_cache_key

        key = None
        if self.cache_dir is not None and dataset_identity is not None:
            key = latent_cache_key(self.encoder, dataset_identity)
        Z = encode(self.encoder, X, batch_size=self.batch_size, device=self.device,
                   cache_dir=self.cache_dir, cache_key=key)
        return Z.astype(np.float64)

    def latents(self, X, dataset_identity: str | None = None) -> np.ndarray:
        """Head inputs ``z`` ``(n, d)`` float64: encoder then projection."""
        self._check_fitted()
        return self.projection.transform(self.raw_latents(X, dataset_identity))

    # -- fit / predict ---------------------------------------------------------------------
    def fit(self, X, y, dataset_identity: str | None = None, noise_sigma: float = 0.0, noise_copies: int = 1,
            random_state: int = 0) -> "Pipeline":
        """Encode ``X``, fit the projection on the latents, then the head. Returns self.

        With ``noise_sigma > 0`` the head also sees ``noise_copies`` Gaussian-noised copies of every
        input (seeded by ``random_state``): Gaussian data augmentation, which makes the pipeline a
        better base classifier for randomized smoothing at that noise level (Cohen et al. train
        with the noise they certify with). Closed-form certificates stay exact for the fitted head.
        """
        from gmcert.projection import make_projection

        if noise_sigma < 0 or not np.isfinite(noise_sigma) or int(noise_copies) < 1:
            raise DataError(f"noise_sigma must be >= 0 and noise_copies >= 1, got {noise_sigma}, {noise_copies}")
        Z, y = self.raw_latents(X, dataset_identity), np.asarray(y)
        if noise_sigma > 0:
            rng = np.random.default_rng(random_state)
            X = np.asarray(X, dtype=np.float32)
            noisy = np.concatenate([X + rng.normal(0.0, noise_sigma, X.shape).astype(np.float32)
                                    for _ in range(int(noise_copies))])
            tag = None if dataset_identity is None else \
                f"{dataset_identity}+gauss(sigma={noise_sigma},copies={noise_copies},seed={random_state})"
            Z = np.concatenate([Z, self.raw_latents(noisy, tag)])
            y = np.concatenate([y] * (int(noise_copies) + 1))
        self.projection = make_projection(self.projection_kind,
                                          None if self.projection_kind == "none" else self.n_components)
        self.head.fit(self.projection.fit_transform(Z), y)
        self.input_shape_ = tuple(np.shape(X)[1:])
        self.lipschitz_ = None
        return self

    def predict(self, X, dataset_identity: str | None = None) -> np.ndarray:
        return self.head.predict(self.latents(X, dataset_identity))

    def _check_fitted(self):
        if self.projection is None:
            raise DataError("this Pipeline is not fitted yet: call fit() or Pipeline.load()")

    # -- input-space radius ----------------------------------------------------------------
    def input_lipschitz(self, mode: str = "auto"):
        """``(L, kind)`` for the map pixels -> z, with ``kind`` in {exact, bound}.

        ``auto``: exact for the linear encoders (orthonormal rows: L = 1), else the sound global
        spectral bound. Computed once per pipeline and saved with it.
        """
        if mode not in LIPSCHITZ_MODES:
            raise DataError(f"lipschitz mode must be one of {LIPSCHITZ_MODES}, got {mode!r}")
        if self.lipschitz_ is None:
            self._check_fitted()
            L_projection = self.projection.lipschitz_constant()
            if self.encoder_name in LINEAR_ENCODERS:
                # Flatten and PCA (no whitening) have orthonormal rows: ||P dx|| <= ||dx|| and the
                # nearest flip in z lifts back to pixels at the same distance (P P^T = I).
                self.lipschitz_ = (float(L_projection), "exact" if L_projection == 1.0 else "bound")
            else:
                from gmcert.lipschitz import lipschitz_constant

                L_encoder, _ = lipschitz_constant(self.encoder, "bound", input_shape=self.input_shape_)
                self.lipschitz_ = (float(L_encoder) * float(L_projection), "bound")
        return self.lipschitz_

    def _estimate_lipschitz(self, x) -> float:
        """CLEVER-style local estimate at one input: NOT sound (kind ``estimate``)."""
        from gmcert.lipschitz import lipschitz_constant

        import torch

        # The Jacobian of projection after encoder: PCA drops directions the head never sees.
        module = torch.nn.Sequential(self.encoder, self.projection.to_torch()).eval()
        return float(lipschitz_constant(module, "estimate", x=x, n_batches=6, batch_size=4, iterations=4)[0])

    def certify(self, X, method: str = "exact", lipschitz: str = "auto", dataset_identity=None):
        """Closed-form certificates, one :class:`Certificate` per input.

        ``lipschitz="estimate"`` (card encoders only) divides by a local CLEVER-style estimate and
        labels the radius ``estimate``; otherwise the radius is ``exact`` or ``bound``.
        """
        start = time.perf_counter()
        Z = self.latents(X, dataset_identity)
        pred, latent_radius = self.head.certify(Z, method=method)
        if lipschitz == "estimate" and self.encoder_name not in LINEAR_ENCODERS:
            import torch
            from tqdm import tqdm

            images = torch.as_tensor(np.asarray(X), dtype=torch.float32)
            L = np.array([self._estimate_lipschitz(images[i:i + 1])
                          for i in tqdm(range(len(images)), desc="CLEVER estimate", unit="input")])
            kind = "estimate"
        else:
            L, kind = self.input_lipschitz(lipschitz)
            L = np.full(len(Z), L)
            # The latent radius itself is exact only from the exact dual with one Gaussian per
            # class; the per-pair closed form and the multi-component bound are lower bounds.
            if kind == "exact" and not (method == "exact" and self.head.n_components_per_class == 1):
                kind = "bound"
        per_point = (time.perf_counter() - start) / max(len(Z), 1)  # the estimates' cost included
        return [
            Certificate(prediction=int(p), radius=float(r / l), radius_kind=kind,
                        path="closed_form", samples=1, stop_reason="closed_form",
                        latent_radius=float(r), time=per_point)
            for p, r, l in zip(pred, latent_radius, L)
        ]

    # -- torch view ------------------------------------------------------------------------
    def torch_module(self, dtype=None):
        """Pixels (or latents) -> class scores ``(N, K)``: the base classifier for smoothing."""
        import torch

        from gmcert.head import GaussianHead

        self._check_fitted()
        dtype = dtype or torch.float32
        from gmcert.encoding import default_device

        module = torch.nn.Sequential(self.encoder, self.projection.to_torch(dtype=dtype),
                                     GaussianHead(self.head, dtype=dtype))
        # One device for all three parts (encode() may already have moved the encoder to CUDA).
        return module.to(torch.device(self.device) if self.device else default_device()).eval()

    def smoother(self, sigma: float, seed: int = 0):
        """A :class:`~gmcert.smoothing.Smoother` whose base classifier is this whole pipeline."""
        from gmcert.smoothing import Smoother

        return Smoother(self.torch_module(), num_classes=len(self.head.classes_), sigma=sigma, seed=seed)

    def label_smoothed(self, cert):
        """Turn a smoothing certificate's class index into this pipeline's label (in place)."""
        if cert.prediction != ABSTAIN:
            cert.prediction = int(self.head.classes_[cert.prediction])
        return cert

    # -- files -----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the model directory atomically: ``pipeline.json``, ``head.npz``, ``projection.npz``."""
        from gmcert.modelio import save_arrays

        self._check_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            meta = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "encoder": self.encoder_name,
                "pretrained": self.pretrained, "projection": self.projection_kind,
                "n_components": self.n_components, "input_shape": list(self.input_shape_),
                "lipschitz": list(self.lipschitz_) if self.lipschitz_ else None,
                "batch_size": self.batch_size, **self.metadata,
            }
            if self.encoder_name not in LINEAR_ENCODERS:
                meta["encoder_description"] = self.encoder.describe()
            (tmp / "pipeline.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
            self.head.save(tmp / "head.npz")
            save_arrays(tmp / "projection.npz", {"format": "gmcert-projection", "format_version": 1},
                        self.projection.to_arrays())
            _replace_directory(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path, device=None, cache_dir=None) -> "Pipeline":
        """Read a model directory written by :meth:`save`; never unpickles."""
        from gmcert.modelio import load_arrays
        from gmcert.projection import projection_from_arrays

        path = Path(path)
        meta_path = path / "pipeline.json"
        if not path.exists():
            raise ModelFileError(path, "missing")
        if not meta_path.is_file():
            raise ModelFileError(path, "foreign", "no pipeline.json: not a gmcert model directory")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelFileError(meta_path, "corrupt", str(err)) from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ModelFileError(meta_path, "foreign", f"format is not {FORMAT!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelFileError(meta_path, "newer_version",
                                 f"version {meta['format_version']} > supported {FORMAT_VERSION}; upgrade gmcert")
        pipeline = cls(encoder=meta["encoder"], projection=meta["projection"], n_components=meta["n_components"],
                       head=GaussianMixtureClassifier.load(path / "head.npz"), pretrained=meta["pretrained"],
                       batch_size=meta.get("batch_size", 64), device=device, cache_dir=cache_dir)
        _, arrays = load_arrays(path / "projection.npz", "gmcert-projection", max_version=1)
        pipeline.projection = projection_from_arrays(arrays)
        pipeline.input_shape_ = tuple(meta["input_shape"])
        pipeline.lipschitz_ = tuple(meta["lipschitz"]) if meta.get("lipschitz") else None
        known = {"format", "format_version", "encoder", "pretrained", "projection", "n_components",
                 "input_shape", "lipschitz", "batch_size", "encoder_description"}
        pipeline.metadata = {k: v for k, v in meta.items() if k not in known}
        return pipeline


def _replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

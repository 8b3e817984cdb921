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

import copy

import numpy as np

from gmcert.errors import DataError
from gmcert.latent.mixture import GaussianMixtureClassifier
from gmcert.modeldir import LINEAR_ENCODERS  # noqa: F401  (re-exported)
from gmcert.closed_form import LIPSCHITZ_MODES, UPPER_TOL, ClosedForm  # noqa: F401  (re-exported)
from gmcert.results import ABSTAIN


def default_head() -> GaussianMixtureClassifier:
    """Full covariances with Ledoit-Wolf shrinkage: d is comparable to the class sizes on small data."""
    return GaussianMixtureClassifier(covariance_type="full", shrinkage="ledoit_wolf")


class Pipeline(ClosedForm):
    """Encoder -> projection -> Gaussian-mixture head.

    Parameters
    ----------
    encoder : str or torch.nn.Module, default "efficientnet_lite0"
        ``none``, ``identity``, an encoder card name or path, ``timm:<model>``, or any torch module
        mapping ``(N, C, H, W)`` pixels to ``(N, D)`` latents (such a pipeline cannot be saved).
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
        self._encoder = None
        if not isinstance(encoder, str):
            self._encoder, encoder = encoder.eval(), "module"
        self.encoder_name = encoder
        self.projection_kind = projection
        self.n_components = n_components
        self.head = head if head is not None else default_head()
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = cache_dir
        self.projection = None
        self.lipschitz_ = {}  # encoder key (input shape, description) -> L of the encoder
        self.metadata = {}
        self._saved_description = None  # what a loaded model's encoder must still be
        self._error_bounds = {}  # input shape -> ForwardErrorBound (layer norms computed once)
        #: files that travel inside the model directory (a trained encoder's card and weights):
        #: name there -> current path; the card is the first
        self.bundled_files = {}

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
                from gmcert.encoders.cards import load_encoder
                from gmcert.encoders.encoding import check_same_encoder

                encoder = load_encoder(self.encoder_name, pretrained=self.pretrained, device=self.device)
                check_same_encoder(self._saved_description, encoder.describe(), self.encoder_name)
                self._encoder = encoder
        return self._encoder

    def encoder_description(self) -> dict:
        """What identifies the encoder's function: card and weights hash, or a module's checksum."""
        if self.encoder_name in LINEAR_ENCODERS:
            return {"encoder": self.encoder_name}
        from gmcert.encoders.encoding import describe_encoder

        return describe_encoder(self.encoder)

    def input_resize(self, image_hw) -> dict | None:
        """The resize the encoder's card applies to ``image_hw`` images and its norm in the bound
        (:func:`gmcert.encoders.resizing.resize_record`); None for none, or for raw pixels and modules."""
        card = getattr(self.encoder, "card", None) if self.encoder_name not in LINEAR_ENCODERS else None
        if card is None:
            return None
        from gmcert.encoders.resizing import resize_record

        return resize_record(card, image_hw)

    def raw_latents(self, X, dataset_identity: str | None = None, dtype=np.float64) -> np.ndarray:
        """Encoder outputs ``(n, D)`` float64, before projection (a card's float32 outputs kept as
        they are with ``dtype=np.float32``: the streamed fit casts them batch by batch)."""
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
        from gmcert.encoders.encoding import encode, latent_cache_key

        key = None
        if self.cache_dir is not None and dataset_identity is not None:
            key = latent_cache_key(self.encoder, dataset_identity)
        Z = encode(self.encoder, X, batch_size=self.batch_size, device=self.device,
                   cache_dir=self.cache_dir, cache_key=key)
        return Z.astype(dtype, copy=False)

    def latents(self, X, dataset_identity: str | None = None) -> np.ndarray:
        """Head inputs ``z`` ``(n, d)`` float64: encoder then projection."""
        self._check_fitted()
        return self.projection.transform(self.raw_latents(X, dataset_identity))

    # -- fit / predict ---------------------------------------------------------------------
    def fit(self, X, y, dataset_identity: str | None = None, noise_sigma: float = 0.0, noise_copies: int = 1,
            random_state: int = 0, distributed: bool = False, select: bool = False) -> "Pipeline":
        """Encode ``X``, fit the projection on the latents, then the head. Returns self.

        ``select``: first choose the head's covariance type, shrinkage and components per class by
        held-out likelihood on these (projected) latents, :func:`gmcert.latent.selection.select_head`;
        the outcome is ``self.selection_`` (else None).

        ``distributed``: every rank of a torchrun job calls this with the same arguments, encodes its
        share of the batches, and fits the same model from the gathered latents.

        With ``noise_sigma > 0`` the head also sees ``noise_copies`` Gaussian-noised copies of every
        input (seeded by ``random_state``): Gaussian data augmentation, which makes the pipeline a
        better base classifier for randomized smoothing at that noise level (Cohen et al. train
        with the noise they certify with). Closed-form certificates stay exact for the fitted head.

        A single-Gaussian head fitted without ``select`` or noise streams (:meth:`_fit_streamed`):
        batched float64 sums, PCA from the streamed scatter, no ``(n, D)`` float64 matrix. EM (several
        components per class), ``select`` (K folds) and noised copies keep every latent in memory.
        """
        from gmcert.encoders.projection import make_projection

        if noise_sigma < 0 or not np.isfinite(noise_sigma) or int(noise_copies) < 1:
            raise DataError(f"noise_sigma must be >= 0 and noise_copies >= 1, got {noise_sigma}, {noise_copies}")
        if noise_sigma == 0 and not select and self.head.n_components_per_class == 1:
            return self._fit_streamed(X, y, dataset_identity, distributed)
        Z, y = self._fit_latents(X, dataset_identity, distributed), np.asarray(y)
        if noise_sigma > 0:
            rng = np.random.default_rng(random_state)
            X = np.asarray(X, dtype=np.float32)
            noisy = np.concatenate([X + rng.normal(0.0, noise_sigma, X.shape).astype(np.float32)
                                    for _ in range(int(noise_copies))])
            tag = None if dataset_identity is None else \
                f"{dataset_identity}+gauss(sigma={noise_sigma},copies={noise_copies},seed={random_state})"
            Z = np.concatenate([Z, self._fit_latents(noisy, tag, distributed)])
            y = np.concatenate([y] * (int(noise_copies) + 1))
        self.projection = make_projection(self.projection_kind,
                                          None if self.projection_kind == "none" else self.n_components)
        Z, self.selection_ = self.projection.fit_transform(Z), None
        if select:  # noised copies of one input share a fold: none is scored by a head fitted on its twin
            from gmcert.latent.selection import select_head

            self.selection_ = select_head(Z, y, random_state=random_state, estimator=self.head,
                                          groups=np.arange(len(Z)) % len(X) if noise_sigma > 0 else None)
            self.head.set_params(**self.selection_.chosen)
        self.head.fit(Z, y)
        self.input_shape_ = tuple(np.shape(X)[1:])
        return self

    def _fit_streamed(self, X, y, dataset_identity, distributed):
        """The two-pass fit of :mod:`gmcert.latent.streaming`: PCA from the raw latents' streamed
        mean and scatter, then the head from the projected latents' per-class sums. Equal to the
        in-memory fit up to rounding (see :meth:`PCAProjection.fit_scatter` for repeated variances)."""
        from gmcert.encoders.projection import make_projection
        from gmcert.latent.streaming import class_statistics, total_moments

        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise DataError(f"y must have shape ({len(X)},) to match the inputs, got {y.shape}")
        batches = self._latent_batches(X, y, dataset_identity, distributed)
        self.projection = make_projection(self.projection_kind,
                                          None if self.projection_kind == "none" else self.n_components)
        if self.projection_kind == "none":
            self.projection.fit(next(iter(batches()))[0])  # reads the width and checks it
        else:
            self.projection.fit_scatter(*total_moments(batches))
        self.head.fit_statistics(class_statistics(batches, np.unique(y), self.projection.transform))
        self.selection_, self.input_shape_ = None, tuple(np.shape(X)[1:])
        return self

    def _latent_batches(self, X, y, dataset_identity, distributed):
        """A callable giving ``(raw latents (b, D) float64, labels (b,))`` batch by batch, in row order.

        Pixels and latents are cut from ``X`` batch by batch; a card encodes once (under torchrun
        each rank its share, gathered), and its latents are kept in the encoder's float32."""
        if self.encoder_name not in LINEAR_ENCODERS:
            Z = self._fit_latents(X, dataset_identity, distributed, dtype=np.float32)
            source, flat = Z, Z.shape[1:]
        else:
            source, flat = X, tuple(np.shape(X)[1:])
            if len(np.shape(X)) != (2 if self.encoder_name == "none" else 4):
                what = "latent inputs must have shape (n, d)" if self.encoder_name == "none" else \
                    "images must have shape (N, C, H, W)"
                raise DataError(f"{what}, got {tuple(np.shape(X))}")
        from gmcert.latent.streaming import array_batches

        return array_batches(source, y, int(np.prod(flat)))

    def _fit_latents(self, X, dataset_identity, distributed, dtype=np.float64):
        """``raw_latents(X)``; under torchrun each rank encodes its batches (the batches one process
        forms, so the same bits) and every rank gets all rows, then fits the same model: gathering
        the latents serves every head (EM, shrinkage, PCA) where merged sufficient statistics would
        serve only single-Gaussian heads, at n x d floats of traffic, small next to the encoding."""
        from gmcert.distributed import all_gather_rows, current, shard

        w = current()
        if not (distributed and w.active) or self.encoder_name in LINEAR_ENCODERS:
            return self.raw_latents(X, dataset_identity, dtype=dtype)
        mine = shard(np.arange(len(X)), w, block=self.batch_size)
        return all_gather_rows(mine, self.raw_latents(np.asarray(X)[mine]), len(X), w)

    def predict(self, X, dataset_identity: str | None = None, arithmetic: str = "auto") -> np.ndarray:
        """Labels ``(n,)``.

        ``arithmetic="certified"``: the arithmetic :meth:`certify`'s radii are about: the float64
        pass of :meth:`certified_latents` (TF32 and FFT/Winograd kernels off while it runs) and the
        head's exact decision. A closed-form radius holds for this function as it runs, at float
        precision (``certify`` shaves the pass's rounding over the whole ball).

        ``arithmetic="fast"``: the float32 encoder pass that ``fit`` and smoothing use (whatever
        kernels the device picks, TF32 included where torch allows it). Its labels agree with the
        certified ones except within rounding of a boundary; closed-form radii do NOT cover it, and
        a radius for it is smoothing's (``probabilistic``, drawn from this same float32 module).

        ``"auto"`` (default): certified wherever the encoder has a rounding analysis (the linear
        encoders and every card the closed form certifies), else fast: an encoder without one
        (a DEQ, say) has no closed-form certificate to keep.
        """
        from gmcert.bounds.lipschitz import LipschitzUnsupportedError

        if arithmetic not in ("auto", "certified", "fast"):
            raise DataError(f"arithmetic must be 'auto', 'certified' or 'fast', got {arithmetic!r}")
        if arithmetic != "fast":
            try:
                return self.head.predict(self.certified_latents(X, dataset_identity)[0])
            except LipschitzUnsupportedError:
                if arithmetic == "certified":
                    raise
        return self.head.predict(self.latents(X, dataset_identity))

    def _check_fitted(self):
        if self.projection is None:
            raise DataError("this Pipeline is not fitted yet: call fit() or Pipeline.load()")

    # -- torch view ------------------------------------------------------------------------
    def torch_module(self, dtype=None):
        """Pixels (or latents) -> class scores ``(N, K)``: the base classifier for smoothing."""
        import torch

        from gmcert.head import GaussianHead

        self._check_fitted()
        dtype = dtype or torch.float32
        from gmcert.encoders.encoding import default_device

        encoder = self.encoder if dtype == torch.float32 else copy.deepcopy(self.encoder).to(dtype)
        module = torch.nn.Sequential(encoder, self.projection.to_torch(dtype=dtype),
                                     GaussianHead(self.head, dtype=dtype))
        # One device for all three parts (encode() may already have moved the encoder to CUDA).
        return module.to(torch.device(self.device) if self.device else default_device()).eval()

    def smoother(self, sigma: float, seed: int = 0):
        """A :class:`~gmcert.smoothing.smoother.Smoother` whose base classifier is this whole pipeline."""
        from gmcert.smoothing.smoother import Smoother

        return Smoother(self.torch_module(), num_classes=len(self.head.classes_), sigma=sigma, seed=seed)

    def label_smoothed(self, cert):
        """Turn a smoothing certificate's class index into this pipeline's label (in place)."""
        if cert.prediction != ABSTAIN:
            cert.prediction = int(self.head.classes_[cert.prediction])
        return cert

    # -- files -----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the model directory atomically: ``pipeline.json``, ``head.npz``, ``projection.npz``."""
        from gmcert.modeldir import save_pipeline

        save_pipeline(self, path)

    @classmethod
    def load(cls, path, device=None, cache_dir=None) -> "Pipeline":
        """Read a model directory written by :meth:`save`; never unpickles."""
        from gmcert.modeldir import load_pipeline

        return load_pipeline(cls, path, device, cache_dir)

"""The pipeline's closed-form certificates: input Lipschitz constants per input shape, the
certified float64 pass (and its rounding over whole balls), and ``certify`` itself. A mixin of
:class:`gmcert.pipeline.Pipeline`, which owns the encoder, projection and head it reads."""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from gmcert.errors import DataError
from gmcert.latent.dual import EPS, RADIUS_SHAVE
from gmcert.modeldir import LINEAR_ENCODERS
from gmcert.results import Certificate

LIPSCHITZ_MODES = ("auto", "bound", "estimate")
#: An ``exact`` latent radius is within the dual solver's tolerance and the shave of the true one;
#: this relative margin (far wider than both) gives a sound upper end for routing.
UPPER_TOL = 1e-7


class ClosedForm:
    """``input_lipschitz``, ``certified_latents`` and ``certify`` of a fitted :class:`Pipeline`."""

    # -- input-space radius ----------------------------------------------------------------
    def input_lipschitz(self, mode: str = "auto", input_shape=None):
        """``(L, kind)`` for the map pixels -> z on inputs of ``input_shape``, ``kind`` in {exact, bound}.

        ``input_shape`` ``(C, H, W)`` defaults to the fitted one. ``auto``: exact for the linear
        encoders when the projection is an isometry up to the shave, else the sound global spectral
        bound. The encoder's constant depends on the input size (its resize) and on the encoder
        itself, so it is kept per (input shape, encoder description), saved with the model, and
        recomputed for any other shape or encoder.
        """
        if mode not in LIPSCHITZ_MODES:
            raise DataError(f"lipschitz mode must be one of {LIPSCHITZ_MODES}, got {mode!r}")
        self._check_fitted()
        L_projection = self.projection.lipschitz_constant()
        if self.encoder_name in LINEAR_ENCODERS:
            # Flatten and PCA (no whitening): ||P dx|| <= ||P|| ||dx||, and when every singular value
            # is 1 the nearest flip in z lifts back to pixels at the same distance.
            return L_projection, "exact" if self.projection.is_isometry() else "bound"
        shape = tuple(int(v) for v in (input_shape if input_shape is not None else self.input_shape_))
        key = self._encoder_key(shape)
        if key not in self.lipschitz_:
            self.lipschitz_[key] = {"input_shape": list(shape), "L": float(self._error_bound(shape).lipschitz)}
        return self.lipschitz_[key]["L"] * L_projection * (1 + 4 * EPS), "bound"

    def _encoder_key(self, shape) -> str:
        payload = json.dumps({"input_shape": list(shape), "encoder": self.encoder_description()},
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def _error_bound(self, shape):
        """The encoder's layer bounds and rounding-error analysis for inputs of ``shape`` (cached)."""
        import torch

        from gmcert.bounds.rounding import ForwardErrorBound

        key = self._encoder_key(shape)
        if key not in self._error_bounds:
            # float64: measured on EfficientNet-Lite0 at 224 px, only about 15% dearer than a
            # float32 pass with the same bound (the bound's arithmetic is float64 either way), and
            # its bound is about 5e8 times tighter
            self._error_bounds[key] = ForwardErrorBound(self.encoder, shape, dtype=torch.float64)
        return self._error_bounds[key]

    def certified_latents(self, X, dataset_identity: str | None = None, ball: bool = False):
        """Head inputs ``z`` ``(n, d)`` float64 and a sound bound ``(n,)`` on ``||z - z_exact||``.

        ``z_exact`` is what exact arithmetic would give. The encoder runs in float64 and
        :class:`gmcert.bounds.rounding.ForwardErrorBound` bounds its rounding error (TF32, cuDNN, oneDNN
        and NNPACK off, so no FFT or Winograd convolution); the projection's rounding is added.
        This is the arithmetic :meth:`predict` runs.

        ``ball=True`` adds ``(E_c (n,), E_r)``: at every ``x'`` within r of ``X_i``, this same pass
        computes a latent within ``E_c_i + E_r r`` of ``z_exact(x')``
        (:mod:`gmcert.bounds.ball_rounding`), so that :meth:`certify`'s radii hold for
        :meth:`predict` as it runs, not only for the exact function.
        """
        self._check_fitted()
        proj = self.projection
        if self.encoder_name in LINEAR_ENCODERS:
            raw = self.raw_latents(X)  # exact: the inputs as float64, reshaped
            Z, err = proj.transform(raw), proj.transform_error(raw)
            return (Z, err, (err, proj.transform_error_rate())) if ball else (Z, err)
        X = np.asarray(X)
        if X.ndim != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {X.shape}")
        if not np.all(np.isfinite(X)):
            raise DataError("images contain NaN or inf")
        raw, err, A, B, rho_c, rho_r = self._certified_pass(X, dataset_identity)
        L_proj, rate, te = proj.lipschitz_constant(), proj.transform_error_rate(), proj.transform_error(raw)
        Z, err = proj.transform(raw), (err * L_proj + te) * (1 + 8 * EPS)
        if not ball:
            return Z, err
        # at x': the encoder errs by A + B r (times the projection's norm), and the projection's
        # rounding there is within its bound at the computed raw latent plus rate times how far
        # the computed raw latent moved (rho_c + rho_r r)
        E_c = (L_proj * A + te + rate * rho_c) * (1 + 8 * EPS)
        return Z, err, (E_c, float((L_proj * B + rate * rho_r) * (1 + 8 * EPS)))

    def _certified_pass(self, X, dataset_identity):
        from gmcert.encoders.encoding import certified_pass

        return certified_pass(self._error_bound(X.shape[1:]), X, self.batch_size, self.device,
                              self.cache_dir, dataset_identity, self.encoder)

    def _estimate_lipschitz(self, x) -> float:
        """CLEVER-style local estimate at one input: NOT sound (kind ``estimate``)."""
        import torch

        from gmcert.bounds.lipschitz import lipschitz_constant

        # the Jacobian of projection after encoder: PCA drops directions the head never sees
        module = torch.nn.Sequential(self.encoder, self.projection.to_torch()).eval()
        return float(lipschitz_constant(module, "estimate", x=x, n_batches=6, batch_size=4, iterations=4)[0])

    def certify(self, X, method: str = "exact", lipschitz: str = "auto", dataset_identity=None):
        """Closed-form certificates, one :class:`Certificate` per input.

        The certificate is for the pipeline's exact-arithmetic function: the latent radius computed
        at the float latent loses the bound on that latent's rounding error (the latent radius is
        1-Lipschitz in z; the bound is ``extra["latent_error"]``), then is divided by the input
        Lipschitz constant for this input shape. ``latent_radius`` is the head's radius at the
        computed latent.
        ``extra["radius_upper"]`` bounds the same quantity from above (``inf`` where the latent
        radius is only a lower bound): hybrid routing uses both. ``lipschitz="estimate"`` (card
        encoders only) divides by a local CLEVER-style estimate and labels the radius
        ``estimate``; otherwise the radius is ``exact`` or ``bound``, row by row.
        """
        start = time.perf_counter()
        Z, err, (E_c, E_r) = self.certified_latents(X, dataset_identity, ball=True)
        pred, computed, exact = self.head.certify(Z, method=method, return_exact=True)
        decided = self.head.predict(Z)  # predict's label; it differs only where the float margin is
        computed, exact = np.where(decided == pred, computed, 0.0), exact & (decided == pred)  # only
        # where the float margin is within rounding: a 0 radius there anyway
        # The classifier as it runs (predict) at x' within r of x computes a latent within
        # L r + err + E_c + E_r r of the computed z: z_exact(x) is within err of z, z_exact(x') within
        # L r of z_exact(x), and predict's latent at x' within E_c + E_r r of z_exact(x'). Below the
        # head's radius at z, the exact decision there is the one at z. ``latent_radius`` stays the
        # head's own radius at the computed latent: a statement about the head, as the TSV says.
        sound_latent = np.maximum(computed * (1 - 4 * EPS) - err - E_c, 0.0) * (1 - 4 * EPS)
        latent_upper = np.where(exact, computed * (1 + UPPER_TOL) + err, np.inf)
        if lipschitz == "estimate" and self.encoder_name not in LINEAR_ENCODERS:
            import torch
            from tqdm import tqdm

            images = torch.as_tensor(np.asarray(X), dtype=torch.float32)
            L = np.array([self._estimate_lipschitz(images[i:i + 1])
                          for i in tqdm(range(len(images)), desc="CLEVER estimate", unit="input", delay=2)])
            kinds = np.full(len(Z), "estimate")
        else:
            L, kind = self.input_lipschitz(lipschitz, input_shape=np.shape(X)[1:])
            L = np.full(len(Z), L)
            # exact only where the head's radius is exact and all the rounding is within the shave
            shaved = err + E_c + E_r * computed / L
            kinds = np.where(exact & (shaved <= RADIUS_SHAVE * computed) & (kind == "exact"), "exact", "bound")
        L_upper, L = L, L + E_r
        per_point = (time.perf_counter() - start) / max(len(Z), 1)  # the estimates' cost included
        return [
            Certificate(prediction=int(p), radius=float(r / l * (1 - 4 * EPS)), radius_kind=str(k),
                        path="closed_form", samples=1, stop_reason="closed_form",
                        latent_radius=float(c), time=per_point,
                        extra={"radius_upper": float(u / lu * (1 + 4 * EPS)), "latent_error": float(e),
                               "covers_predict": True})
            for p, r, c, u, l, lu, k, e in zip(decided, sound_latent, computed, latent_upper, L, L_upper, kinds,
                                               err)
        ]

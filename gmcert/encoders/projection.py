"""Fitted linear projections of latents: PCA (orthonormal rows, no whitening) and identity.

Both are 1-Lipschitz in the L2 norm with equality on the row space, so a latent radius after the
projection is a radius before it (BRIEF section 4): whitening would break that, so it is not offered.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gmcert.latent.dual import EPS, RADIUS_SHAVE
from gmcert.errors import DataError, ModelFileError
from gmcert.networks.projection_layer import ProjectionLayer

PROJECTIONS = ("pca", "none")
#: Rows whose Gram matrix is this close to the identity count as orthonormal.
ORTHONORMAL_TOL = 1e-10


def _check_fitted(obj):
    if getattr(obj, "components_", None) is None:
        raise DataError(f"this {type(obj).__name__} is not fitted yet: call fit(Z) first")


class PCAProjection:
    """Principal components of latents, rows orthonormal.

    Parameters
    ----------
    n_components : int
        Output dimension k; at most ``min(n_samples, n_features)``.

    Attributes
    ----------
    mean_ : ndarray of shape (d,)
    components_ : ndarray of shape (k, d)
        Orthonormal rows, sorted by decreasing variance; the sign makes each row's largest
        absolute entry positive, so refits give identical arrays.
    explained_variance_ : ndarray of shape (k,)
    n_features_in_ : int
    """

    kind = "pca"

    def __init__(self, n_components: int):
        self.n_components = n_components
        self.components_ = None

    def fit(self, Z) -> PCAProjection:
        """Fit on ``Z`` of shape (n, d) (float64 internally)."""
        Z = _as_matrix(Z, "Z")
        n, d = Z.shape
        k = self.n_components
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= min(n, d):
            raise DataError(f"n_components must be an int in [1, min(n_samples, n_features)] = "
                            f"[1, {min(n, d)}], got {k!r}")
        self.mean_ = Z.mean(axis=0)
        _, s, vt = np.linalg.svd(Z - self.mean_, full_matrices=False)
        self._set_rows(vt[:k], s[:k] ** 2 / max(n - 1, 1), d)
        return self

    def fit_scatter(self, n_samples, mean, scatter) -> PCAProjection:
        """Fit from the moments of ``n_samples`` latents: their ``mean (d,)`` and ``scatter (d, d)``
        ``sum (z - mean)(z - mean)^T``, e.g. summed over a stream of batches in float64.

        The eigenvectors of the covariance ``scatter / (n - 1)`` are the right singular vectors of
        the centred data, so this is :meth:`fit` without the ``(n, d)`` matrix: equal to it up to
        rounding wherever the top ``k`` variances are separated (within a repeated variance any
        orthonormal basis of its eigenspace is a principal basis, and the two may pick different ones).
        """
        n, mean = int(n_samples), np.asarray(mean, dtype=np.float64)
        scatter = np.asarray(scatter, dtype=np.float64)
        d, k = len(mean), self.n_components
        if scatter.shape != (d, d) or not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scatter))):
            raise DataError(f"mean (d,) and scatter (d, d) must be finite, got shapes {mean.shape}, {scatter.shape}")
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= min(n, d):
            raise DataError(f"n_components must be an int in [1, min(n_samples, n_features)] = "
                            f"[1, {min(n, d)}], got {k!r}")
        variance, vectors = np.linalg.eigh((scatter + scatter.T) / (2 * max(n - 1, 1)))
        order = np.argsort(variance, kind="stable")[::-1][:k]
        self.mean_ = mean
        self._set_rows(vectors[:, order].T, np.maximum(variance[order], 0.0), d)
        return self

    def _set_rows(self, rows, variance, d):
        """Orthonormal ``rows (k, d)``, the sign making each row's largest absolute entry positive."""
        k = len(rows)
        signs = np.sign(rows[np.arange(k), np.argmax(np.abs(rows), axis=1)])
        self.components_ = rows * np.where(signs == 0, 1.0, signs)[:, None]
        self.explained_variance_ = variance
        self.n_features_in_ = d

    def transform(self, Z) -> np.ndarray:
        """Project ``Z`` (n, d) -> (n, k) float64."""
        _check_fitted(self)
        Z = _as_matrix(Z, "Z")
        if Z.shape[1] != self.n_features_in_:
            raise DataError(f"Z has {Z.shape[1]} features, the projection was fitted on {self.n_features_in_}")
        return (Z - self.mean_) @ self.components_.T

    def fit_transform(self, Z) -> np.ndarray:
        return self.fit(Z).transform(Z)

    def singular_value_range(self) -> tuple:
        """``(lower bound on sigma_min, upper bound on sigma_max)`` of ``components_``, in float64.

        From the eigenvalues of the Gram matrix ``C C^T``, widened by the rounding error of forming
        it (``gamma_d |C||C|^T``, at most ``gamma_d k`` in norm with unit rows) and the eigensolver's
        backward error. Rows orthonormal to 1e-10 are not orthonormal: the map's true norm is used.
        """
        _check_fitted(self)
        C = self.components_
        k, d = C.shape
        eig = np.linalg.eigvalsh(C @ C.T)
        err = _gamma(d) * (np.abs(C) @ np.abs(C).T).sum(axis=1).max() + 16 * k * EPS * abs(eig[-1])
        return float(np.sqrt(max(eig[0] - err, 0.0))), float(np.sqrt(eig[-1] + err) * (1 + 4 * EPS))

    def lipschitz_constant(self) -> float:
        """Sound upper bound on the spectral norm of ``components_`` (1 up to rounding for PCA)."""
        return self.singular_value_range()[1]

    def is_isometry(self) -> bool:
        """Every singular value within ``RADIUS_SHAVE`` of 1: the nearest flip in z lifts back to the
        input at the same distance up to the shave, so input radii may be called ``exact``."""
        low, high = self.singular_value_range()
        return 1 - RADIUS_SHAVE <= low and high <= 1 + RADIUS_SHAVE

    def transform_error(self, Z) -> np.ndarray:
        """Per-row bound ``(n,)`` on ``||transform(Z) - (Z - mean) C^T||_2`` (float64 rounding).

        ``fl(Z - mean)`` errs by ``u |Z - mean|`` and each dot product of d terms by
        ``gamma_d |Z - mean| |C|^T``; the bound itself is evaluated with positive terms only, so
        inflating it by ``gamma_{d+2}`` covers its own rounding.
        """
        _check_fitted(self)
        Z = _as_matrix(Z, "Z")
        d = Z.shape[1]
        bound = (np.abs(Z) + np.abs(self.mean_)) @ np.abs(self.components_).T
        return np.linalg.norm(bound, axis=1) * _gamma(d + 2) * (1 + _gamma(d + 2))

    def transform_error_rate(self) -> float:
        """``c`` with ``transform_error``'s bound at ``Z'`` within ``transform_error(Z) + c ||Z' - Z||``.

        The bound is ``g ||(|Z| + |mean|) |C|^T||`` and ``||Z'| - |Z|| <= |Z' - Z|``, so ``c`` is
        ``g`` times ``||abs(C)||_2 <= sqrt(max row sum * max column sum)`` (no power iteration).
        """
        _check_fitted(self)
        A, d = np.abs(self.components_), self.components_.shape[1]
        norm = np.sqrt(A.sum(axis=1).max() * A.sum(axis=0).max()) * (1 + _gamma(d + 2))
        return float(norm * _gamma(d + 2) * (1 + _gamma(d + 2)))

    def to_torch(self, dtype=torch.float32) -> ProjectionLayer:
        """The projection as a module (for smoothing the whole pipeline and Lipschitz bounds)."""
        _check_fitted(self)
        return ProjectionLayer(self.mean_, self.components_, dtype)

    def to_arrays(self) -> dict:
        """Plain arrays for ``gmcert.latent.modelio.save_arrays`` (no pickle)."""
        _check_fitted(self)
        return {"kind": np.array(self.kind), "mean": self.mean_, "components": self.components_,
                "explained_variance": self.explained_variance_}

    @classmethod
    def from_arrays(cls, arrays: dict) -> PCAProjection:
        """Inverse of :meth:`to_arrays`; validates shapes, finiteness and orthonormality."""
        try:
            mean = np.asarray(arrays["mean"], dtype=np.float64)
            comps = np.asarray(arrays["components"], dtype=np.float64)
            var = np.asarray(arrays["explained_variance"], dtype=np.float64)
        except KeyError as err:
            raise ModelFileError("projection", "corrupt", f"missing array {err}") from err
        if comps.ndim != 2 or mean.shape != (comps.shape[1],) or var.shape != (comps.shape[0],):
            raise ModelFileError("projection", "corrupt", f"shapes mean {mean.shape}, components {comps.shape}")
        if not (np.all(np.isfinite(comps)) and np.all(np.isfinite(mean))):
            raise ModelFileError("projection", "corrupt", "non-finite values")
        gram_error = np.abs(comps @ comps.T - np.eye(comps.shape[0])).max()
        if gram_error > ORTHONORMAL_TOL:
            raise ModelFileError("projection", "corrupt", f"rows not orthonormal (error {gram_error:.2e})")
        out = cls(int(comps.shape[0]))
        out.mean_, out.components_, out.explained_variance_ = mean, comps, var
        out.n_features_in_ = int(comps.shape[1])
        return out


class IdentityProjection:
    """The ``none`` projection: latents pass through unchanged (as float64)."""

    kind = "none"

    def fit(self, Z) -> IdentityProjection:
        self.n_features_in_ = _as_matrix(Z, "Z").shape[1]
        return self

    def transform(self, Z) -> np.ndarray:
        return _as_matrix(Z, "Z")

    def fit_transform(self, Z) -> np.ndarray:
        return self.fit(Z).transform(Z)

    def lipschitz_constant(self) -> float:
        return 1.0

    def is_isometry(self) -> bool:
        return True

    def transform_error(self, Z) -> np.ndarray:
        """The identity computes nothing: no rounding error."""
        return np.zeros(len(_as_matrix(Z, "Z")))

    def transform_error_rate(self) -> float:
        return 0.0

    def to_torch(self, dtype=torch.float32) -> nn.Module:
        return nn.Flatten(1)

    def to_arrays(self) -> dict:
        return {"kind": np.array(self.kind)}

    @classmethod
    def from_arrays(cls, arrays: dict) -> IdentityProjection:
        return cls()


def make_projection(kind: str, n_components: int | None = None):
    """``"pca"`` (needs ``n_components``) or ``"none"``."""
    if kind == "pca":
        if n_components is None:
            raise DataError("projection 'pca' needs n_components")
        return PCAProjection(n_components)
    if kind == "none":
        return IdentityProjection()
    raise DataError(f"projection must be one of {PROJECTIONS}, got {kind!r}")


def projection_from_arrays(arrays: dict):
    """Rebuild whichever projection ``to_arrays`` saved (dispatch on its ``kind`` entry)."""
    kind = str(np.asarray(arrays.get("kind", "")))
    if kind == "pca":
        return PCAProjection.from_arrays(arrays)
    if kind == "none":
        return IdentityProjection()
    raise ModelFileError("projection", "corrupt", f"unknown projection kind {kind!r}")


def _gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an n-term float64 sum of products."""
    u = EPS / 2
    return n * u / (1 - n * u)


def _as_matrix(Z, name):
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2 or Z.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty 2-D array (n_samples, n_features), got shape {Z.shape}")
    if not np.all(np.isfinite(Z)):
        raise DataError(f"{name} contains NaN or inf")
    return Z

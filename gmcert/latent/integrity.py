"""What a loaded head must satisfy before a certificate may trust it.

A model file may come from someone else. ``head.npz`` stores the covariances (in scikit-learn's
layout for the covariance type) and, for speed, every quantity derived from them: precisions,
log-determinants, log-weights. The certificates trust the derived arrays and the structure
(``tied``: one shared precision, so boundaries are hyperplanes; ``diag``: diagonal precisions),
and the torch head trusts the precisions. Nothing made those agree, so a crafted file could
certify one function and deploy another.

So the covariances are the one source of truth. On load, :func:`checked_head_arrays` checks
their layout against ``covariance_type`` and that they are symmetric, finite and positive
definite, recomputes precisions and log-determinants from them with the very function the fit
uses (:func:`precisions_from_covariances`: bit-identical on the same machine), refuses a stored
array that disagrees with its recomputation, and returns the recomputed arrays, which are the
only ones used afterwards. Priors, log-weights, means and component labels are checked against
each other. Each refusal names the field.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

#: A stored derived array may differ from its recomputation by this much (relative to its own
#: largest entry) before it counts as disagreeing: room for another machine's LAPACK, far below
#: any change that would move a certificate (the recomputed array is what is used either way).
DERIVED_RTOL = 1e-6
#: Covariances are symmetric up to this relative asymmetry (a multi-component fit leaves ~1e-16).
SYMMETRY_RTOL = 1e-10
#: The fit's limit on a covariance's conditioning, beyond what float64 scores can resolve.
MIN_EIGENVALUE_RATIO = 1e-12


class HeadInconsistency(ValueError):
    """One field of a head that fails a check; ``field`` names it."""

    def __init__(self, field, detail):
        self.field = field
        super().__init__(f"{field}: {detail}")


def precisions_from_covariances(covs, owners=None):
    """Precisions ``(M, d, d)`` and log-determinants ``(M,)`` of covariances ``(M, d, d)``.

    Shared by the fit and the load, so that both derive the same bits. A covariance whose
    smallest eigenvalue is not above ``MIN_EIGENVALUE_RATIO`` times its largest is refused with
    :class:`HeadInconsistency` on ``covariances_`` (``owners[m]`` names component m's owner).
    """
    precisions, log_dets = np.empty_like(covs), np.empty(len(covs))
    for m, cov in enumerate(covs):
        ev = np.linalg.eigvalsh(cov)
        if not ev[0] > MIN_EIGENVALUE_RATIO * ev[-1]:
            owner = f"component {m}" if owners is None else owners[m]
            raise HeadInconsistency("covariances_", f"the {owner} covariance is singular or not positive "
                                    f"definite (eigenvalues {ev[0]:.3g} .. {ev[-1]:.3g})")
        chol = np.linalg.cholesky(cov)
        inv_chol = np.linalg.inv(chol)
        precisions[m] = inv_chol.T @ inv_chol
        log_dets[m] = 2 * np.log(np.diagonal(chol)).sum()
    return (precisions + precisions.transpose(0, 2, 1)) / 2, log_dets


def full_covariances(covariance_type, covariances, n_components, d):
    """The stored ``covariances_`` as ``(M, d, d)``, after checking its layout for the type."""
    covariances = np.asarray(covariances)
    expected = {"full": (n_components, d, d), "tied": (d, d), "diag": (n_components, d),
                "spherical": (n_components,)}[covariance_type]
    if covariances.shape != expected or covariances.dtype.kind != "f":
        raise HeadInconsistency("covariances_", f"shape {covariances.shape} ({covariances.dtype}); a "
                                f"{covariance_type!r} head with {n_components} components in {d} "
                                f"dimensions stores float {expected}")
    if not np.isfinite(covariances).all():
        raise HeadInconsistency("covariances_", "holds NaN or infinity")
    covariances = covariances.astype(np.float64)
    if covariance_type == "tied":
        return np.repeat(covariances[None], n_components, axis=0)
    if covariance_type == "diag":
        return covariances[:, :, None] * np.eye(d)
    if covariance_type == "spherical":
        return covariances[:, None, None] * np.eye(d)
    return covariances


def checked_head_arrays(covariance_type, n_features, arrays):
    """Check a head's arrays against each other; return the derived ones recomputed.

    Parameters
    ----------
    covariance_type : {"full", "tied", "diag", "spherical"}
    n_features : int
        ``d``, the latent dimension the head was fitted on.
    arrays : dict
        ``classes_``, ``priors_``, ``means_``, ``covariances_``, ``component_class_``,
        ``component_log_weights_``, ``component_means_``, ``component_precisions_``,
        ``component_log_dets_``, as stored.

    Returns
    -------
    dict with ``component_precisions_`` ``(M, d, d)`` and ``component_log_dets_`` ``(M,)``,
    recomputed from ``covariances_``.

    Raises
    ------
    HeadInconsistency
        Naming the first field that fails.
    """
    if covariance_type not in ("full", "tied", "diag", "spherical"):
        raise HeadInconsistency("params.covariance_type", f"{covariance_type!r} is not a covariance type")
    classes = np.asarray(arrays["classes_"])
    n_classes = len(classes)
    if classes.ndim != 1 or n_classes < 2 or len(np.unique(classes)) != n_classes:
        raise HeadInconsistency("classes_", f"needs at least 2 distinct labels in one dimension, got shape {classes.shape}")
    means = _finite_float(arrays, "component_means_", ndim=2)
    n_comp, d = means.shape
    if d != n_features or n_comp < n_classes:
        raise HeadInconsistency("component_means_", f"shape {means.shape}: expected ({'>='}{n_classes}, {n_features})")
    if not np.array_equal(np.asarray(arrays["means_"]), means):
        raise HeadInconsistency("means_", "differs from component_means_")
    owners = _component_class(arrays, n_comp, n_classes)
    priors = _finite_float(arrays, "priors_", ndim=1)
    if priors.shape != (n_classes,) or not (priors > 0).all() or abs(priors.sum() - 1) > 1e-9:
        raise HeadInconsistency("priors_", f"must be {n_classes} positive numbers summing to 1")
    log_weights = _finite_float(arrays, "component_log_weights_", ndim=1)
    if log_weights.shape != (n_comp,):
        raise HeadInconsistency("component_log_weights_", f"shape {log_weights.shape}, expected ({n_comp},)")
    per_class = np.array([logsumexp(log_weights[owners == k]) for k in range(n_classes)])
    if np.abs(per_class - np.log(priors)).max() > 1e-9:
        raise HeadInconsistency("component_log_weights_", "the components' weights do not add up to the class priors")
    covs = full_covariances(covariance_type, arrays["covariances_"], n_comp, d)
    asymmetry = np.abs(covs - covs.transpose(0, 2, 1)).max()
    if asymmetry > SYMMETRY_RTOL * np.abs(covs).max():
        raise HeadInconsistency("covariances_", f"not symmetric (asymmetry {asymmetry:.3g})")
    precisions, log_dets = precisions_from_covariances(covs, [f"class {classes[k]!r}" for k in owners])
    _agrees(arrays, "component_precisions_", precisions, axes=(1, 2))
    _agrees(arrays, "component_log_dets_", log_dets, axes=None)
    return {"component_precisions_": precisions, "component_log_dets_": log_dets}


def _finite_float(arrays, name, ndim):
    value = np.asarray(arrays[name])
    if value.ndim != ndim or value.dtype.kind != "f" or not np.isfinite(value).all():
        raise HeadInconsistency(name, f"must be finite floats in {ndim} dimensions, got {value.dtype} {value.shape}")
    return value.astype(np.float64)


def _component_class(arrays, n_comp, n_classes):
    owners = np.asarray(arrays["component_class_"])
    if owners.shape != (n_comp,) or owners.dtype.kind not in "iu" or owners.min() < 0 or owners.max() >= n_classes \
            or len(np.unique(owners)) != n_classes:
        raise HeadInconsistency("component_class_", f"must give each of the {n_comp} components one of the "
                                f"{n_classes} classes, each class at least one")
    return owners.astype(np.int64)


def _agrees(arrays, name, recomputed, axes):
    stored = np.asarray(arrays[name])
    if stored.shape != recomputed.shape or not np.isfinite(stored).all():
        raise HeadInconsistency(name, f"shape {stored.shape}, expected {recomputed.shape}, finite")
    scale = np.abs(recomputed).max(axis=axes, keepdims=axes is not None) if axes else np.maximum(np.abs(recomputed), 1.0)
    if (np.abs(stored - recomputed) > DERIVED_RTOL * scale).any():
        raise HeadInconsistency(name, "does not match what covariances_ give (recomputed on load); the file "
                                "was changed or written by something other than gmcert")

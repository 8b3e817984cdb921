"""What :func:`gmcert.mismatch.divergence.mismatch_report` accepts: a fitted model, finite latents
of its dimension, known labels, enough points per class for k-NN entropy; and when to warn that
the estimate is only indicative (high dimension, thin classes)."""
from __future__ import annotations

import warnings

import numpy as np

from gmcert.errors import DataError

#: Above this dimension k-NN entropy estimates are known to be badly biased.
HIGH_DIMENSION = 10
#: Below this many points per dimension in a class the estimate is warned about.
POINTS_PER_DIMENSION = 20
BIAS_CORRECTIONS = ("mixture_reference", "gaussian_reference", "none")


def check_report_inputs(model, Z, y, k, n_bootstrap, n_q_samples, alpha, bias_correction):
    """``(Z as float64, class index per row, points per class)``, or a DataError naming the problem."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(model)
    for name, value in (("k", k), ("n_bootstrap", n_bootstrap), ("n_q_samples", n_q_samples)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise DataError(f"alpha must lie in (0, 1), got {alpha!r}")
    if bias_correction not in BIAS_CORRECTIONS:
        raise DataError(f"bias_correction must be one of {BIAS_CORRECTIONS}, got {bias_correction!r}")
    try:
        Z = np.asarray(Z, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"Z must be a numeric array: {exc}") from None
    if Z.ndim != 2 or Z.shape[1] != model.n_features_in_:
        raise DataError(f"Z must have shape (n, {model.n_features_in_}), got {Z.shape}")
    if not np.all(np.isfinite(Z)):
        raise DataError(f"Z contains {int(np.sum(~np.isfinite(Z)))} NaN or infinite values")
    y = np.asarray(y)
    if y.shape != (len(Z),):
        raise DataError(f"y must have shape ({len(Z)},) to match Z, got {y.shape}")
    index = {c.item() if isinstance(c, np.generic) else c: j for j, c in enumerate(model.classes_)}
    try:
        cls = np.array([index[v.item() if isinstance(v, np.generic) else v] for v in y], dtype=np.intp)
    except (KeyError, TypeError):
        unknown = sorted({str(v) for v in y
                          if (v.item() if isinstance(v, np.generic) else v) not in index})
        raise DataError(f"y holds labels the model does not know: {unknown[:10]}") from None
    n_per_class = np.bincount(cls, minlength=len(model.classes_))
    d = Z.shape[1]
    for j, c in enumerate(model.classes_):
        if n_per_class[j] <= k:
            raise DataError(f"class {c} has {n_per_class[j]} points; k-NN entropy with k={k} "
                            "needs more than k (lower k or supply more data)")
        if n_per_class[j] <= d:
            raise DataError(f"class {c} has {n_per_class[j]} points in d={d} dimensions; a "
                            f"d-dimensional entropy needs more than d points (project the latents)")
    thin = [str(c) for j, c in enumerate(model.classes_) if n_per_class[j] < POINTS_PER_DIMENSION * d]
    if d > HIGH_DIMENSION or thin:
        warnings.warn(
            f"k-NN KL estimates are biased in high dimension (d={d}"
            + (f"; classes {', '.join(thin[:10])} have fewer than {POINTS_PER_DIMENSION}*d points"
               if thin else "")
            + "): read eps as indicative only and estimate it on a projected latent "
            f"(e.g. PCA to <= {HIGH_DIMENSION} dims)", stacklevel=3)
    return Z, cls, n_per_class

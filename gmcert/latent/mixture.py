"""The latent Gaussian-mixture classifier (BRIEF §2): covariance structures with shrinkage,
class scores and certificates. The streaming statistics and the shrinkage formulas live in
:mod:`gmcert.latent.moments` (re-exported here); the certificate maths in :mod:`gmcert.latent.certificates`.

Covariances are maximum-likelihood (divide by n), as in scikit-learn's GaussianMixture, LDA and
QDA (checked against scikit-learn 1.9). Regularisation, in order: shrinkage of the full per-class (``tied``: pooled
within-class) covariance, restriction to the structure (``diag``: its diagonal; ``spherical``:
the mean of its diagonal), then ``reg_covar`` added to the diagonal.
"""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from gmcert.errors import DataError
from gmcert.latent import certificates
from gmcert.latent.exact_decision import exact_decisions
from gmcert.latent.integrity import HeadInconsistency, precisions_from_covariances
from gmcert.latent.moments import SufficientStatistics, label_indices, shrunk_covariance

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
SHRINKAGE_METHODS = ("ledoit_wolf", "oas")
EM_STEPS = 25


class GaussianMixtureClassifier(ClassifierMixin, BaseEstimator):
    """Gaussian (mixture) class-conditional classifier with certified latent radii.

    Parameters
    ----------
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
    shrinkage : None, "ledoit_wolf", "oas" or float in [0, 1], default=None
        See :func:`shrunk_covariance`; applied before the structure and ``reg_covar``.
    reg_covar : float >= 0, default=1e-6
        Added to the diagonal of every covariance.
    priors : array-like (K,) of positive floats summing to 1, or None (class frequencies)
    n_components_per_class : int >= 1, default=1
        Above 1, each class is a mixture fitted by k-means then ``EM_STEPS`` EM steps; this
        needs the class's data in memory (``fit`` only, no ``partial_fit``). Class scores are
        ``2 logsumexp`` of component scores; ``tied`` shares one covariance among all components.
    chunk_size : int, default=65536
        Rows per chunk when accumulating statistics.
    random_state : int, RandomState or None
        Seeds k-means and EM (only used when ``n_components_per_class > 1``).

    Attributes
    ----------
    classes_, n_features_in_, priors_ (K,)
    means_ (M, d), covariances_ (scikit-learn GaussianMixture layout), shrinkage_ (M,) or (1,)
        Per component; with one component per class, per class.
    component_class_, component_log_weights_, component_means_, component_precisions_,
    component_log_dets_
        Every covariance type materialised as full precision matrices (see the preamble contract).
    statistics_ : SufficientStatistics
        Per-class statistics of all data seen.
    """

    def __init__(self, covariance_type="full", shrinkage=None, reg_covar=1e-6, priors=None,
                 n_components_per_class=1, chunk_size=65536, random_state=None):
        self.covariance_type = covariance_type
        self.shrinkage = shrinkage
        self.reg_covar = reg_covar
        self.priors = priors
        self.n_components_per_class = n_components_per_class
        self.chunk_size = chunk_size
        self.random_state = random_state

    # ------------------------------------------------------------------ fitting
    def fit(self, Z, y):
        """Fit from latents ``Z (n, d)`` and labels ``y (n,)``; returns self."""
        self._check_params()
        Z, y = self._check_training_data(Z, y, reset=True)
        classes = np.unique(y)
        if len(classes) < 2:
            raise DataError(f"y: needs at least 2 classes, got {len(classes)} class")
        self.statistics_ = SufficientStatistics.from_data(Z, y, classes, self.chunk_size)
        self.classes_ = classes
        if self.n_components_per_class == 1:
            self._estimate(self.statistics_)
        else:
            self._fit_components(Z, self.statistics_.class_indices(y))
        return self

    def fit_statistics(self, statistics):
        """Fit from per-class :class:`SufficientStatistics` of latents (taken in a stream, e.g. by
        ``gmcert.pipeline``'s batched fit) instead of the latents themselves; returns self.

        The same estimate as :meth:`fit` on the data the statistics were taken from, up to the
        rounding of the sums: every single-component head (each covariance type, each shrinkage,
        Ledoit-Wolf's from the quartic sums) is a function of them. Several components per class
        need EM over the data, and raise ValueError here.
        """
        self._check_params()
        if self.n_components_per_class != 1:
            raise ValueError("fit_statistics needs n_components_per_class=1 (EM needs all data in memory)")
        if not isinstance(statistics, SufficientStatistics):
            raise DataError(f"statistics must be a SufficientStatistics, got {type(statistics).__name__}")
        if len(statistics.classes) < 2:
            raise DataError(f"y: needs at least 2 classes, got {len(statistics.classes)} class")
        arrays = (statistics.count, statistics.reference, statistics.sum, statistics.outer,
                  statistics.cubic, statistics.quartic)
        if not all(np.all(np.isfinite(a)) for a in arrays):
            raise DataError("statistics contain NaN or inf")
        self.n_features_in_ = int(statistics.reference.shape[1])
        self.statistics_, self.classes_ = statistics, statistics.classes
        self._estimate(statistics)
        return self

    def partial_fit(self, Z, y, classes=None):
        """Add a chunk of data; parameters are re-estimated once every class has 2 samples.

        ``classes`` (all labels that will ever appear) is needed on the first call unless this
        chunk holds them all.
        """
        if self.n_components_per_class != 1:
            raise ValueError("partial_fit needs n_components_per_class=1 (EM needs all data in memory)")
        first = not hasattr(self, "statistics_")
        if first:
            self._check_params()
        Z, y = self._check_training_data(Z, y, reset=first)
        if first:
            self.classes_ = np.unique(y if classes is None else classes)
            self.statistics_ = SufficientStatistics.empty(self.classes_, Z.shape[1])
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise DataError(f"classes: {np.unique(classes).tolist()} differ from the first call's "
                            f"{self.classes_.tolist()}")
        self.statistics_.accumulate(Z, y, self.chunk_size)
        if len(self.classes_) >= 2 and (self.statistics_.count >= 2).all():
            self._estimate(self.statistics_)
        return self

    def _check_params(self):
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {self.covariance_type!r}")
        s = self.shrinkage
        if not (s is None or (isinstance(s, str) and s in SHRINKAGE_METHODS) or
                (isinstance(s, Real) and not isinstance(s, bool) and 0 <= s <= 1)):
            raise ValueError(f"shrinkage must be None, {SHRINKAGE_METHODS} or a float in [0, 1], got {s!r}")
        if not (isinstance(self.reg_covar, Real) and np.isfinite(self.reg_covar) and self.reg_covar >= 0):
            raise ValueError(f"reg_covar must be a finite float >= 0, got {self.reg_covar!r}")
        for name in ("n_components_per_class", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def _check_training_data(self, Z, y, reset):
        try:
            Z, y = validate_data(self, Z, y, reset=reset, dtype=np.float64)
            check_classification_targets(y)
        except DataError:
            raise
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        return Z, y

    def _priors(self, count):
        if self.priors is None:
            return count / count.sum()
        priors = np.asarray(self.priors, dtype=np.float64).ravel()
        if len(priors) != len(count) or not (priors > 0).all() or abs(priors.sum() - 1) > 1e-6:
            raise ValueError(f"priors must be {len(count)} positive numbers summing to 1, got {self.priors!r}")
        return priors / priors.sum()

    def _estimate(self, stats):
        """Single-component fit from class statistics."""
        too_few = stats.count < 2
        if too_few.any():
            raise DataError(f"classes {stats.classes[too_few].tolist()} have fewer than 2 samples; "
                            "a covariance needs at least 2")
        count, mean, scatter, quartic = stats.centered()
        self.priors_ = self._priors(count)
        self._set_components(np.arange(len(count)), np.log(self.priors_), count, mean, scatter, quartic)

    def _covariances(self, count, mean, scatter, quartic, owners):
        """Covariances (M, d, d), precisions, log-determinants and shrinkage intensities of
        components from their centred statistics; ``owners`` (M,) labels name them in errors."""
        d = mean.shape[1]
        if self.covariance_type == "tied":
            cov, s = shrunk_covariance(scatter.sum(0) / count.sum(), count.sum(), quartic.sum(), self.shrinkage)
            covs, shrink = np.repeat(cov[None], len(count), axis=0), np.array([s])
        else:
            pairs = [shrunk_covariance(S / n, n, q, self.shrinkage) for S, n, q in zip(scatter, count, quartic)]
            covs, shrink = np.array([c for c, _ in pairs]), np.array([s for _, s in pairs])
        if self.covariance_type == "diag":
            covs = np.einsum("kdd->kd", covs)[:, :, None] * np.eye(d)
        elif self.covariance_type == "spherical":
            covs = (np.einsum("kdd->k", covs) / d)[:, None, None] * np.eye(d)
        covs = covs + self.reg_covar * np.eye(d)
        owner = ["tied"] * len(covs) if self.covariance_type == "tied" else [f"class {o!r}" for o in owners]
        try:  # the load recomputes with the same function (gmcert.latent.integrity): the same bits
            precisions, log_dets = precisions_from_covariances(covs, owner)
        except HeadInconsistency as exc:
            raise DataError(f"{str(exc).split(': ', 1)[1]}; increase reg_covar or set shrinkage") from None
        return covs, precisions, log_dets, shrink

    def _set_components(self, component_class, log_weights, count, mean, scatter, quartic):
        covs, precisions, log_dets, shrink = self._covariances(
            count, mean, scatter, quartic, self.classes_[component_class])
        self.component_class_ = np.asarray(component_class, dtype=np.int64)
        self.component_log_weights_ = np.asarray(log_weights, dtype=np.float64)
        self.component_means_ = self.means_ = mean
        self.component_precisions_, self.component_log_dets_ = precisions, log_dets
        self.shrinkage_ = shrink
        self.covariances_ = {"full": covs, "tied": covs[0], "diag": np.einsum("kdd->kd", covs),
                             "spherical": covs[:, 0, 0]}[self.covariance_type]
        self._build_geometry()

    def _structure(self):
        return {"full": "full", "tied": "tied", "diag": "diag", "spherical": "diag"}[self.covariance_type]

    def _build_geometry(self):
        structure = self._structure()
        self._geometry = certificates.MixtureGeometry(
            self.component_class_, self.component_log_weights_, self.component_means_,
            self.component_precisions_, self.component_log_dets_, structure)
        n_comp, d = self.component_means_.shape
        if structure == "full" and n_comp * n_comp * d * d <= 2 ** 23:  # <= 64 MB of eigenvectors
            self._geometry.precompute_pairs()

    def _fit_components(self, Z, idx):
        """k-means then EM within each class; the final M-step sees all classes (tied pooling)."""
        from sklearn.cluster import KMeans

        rng = check_random_state(self.random_state)
        M, K = self.n_components_per_class, len(self.classes_)
        self.priors_ = self._priors(self.statistics_.count)
        resps = []
        for k in range(K):
            Zk = Z[idx == k]
            if len(Zk) < 2 * M:
                raise DataError(f"class {self.classes_[k]!r} has {len(Zk)} samples; "
                                f"n_components_per_class={M} needs at least {2 * M}")
            labels = KMeans(M, n_init=3, random_state=rng.randint(2 ** 31 - 1)).fit(Zk).labels_
            resp = np.eye(M)[labels]
            owners = np.repeat(self.classes_[k:k + 1], M)
            for _ in range(EM_STEPS):
                stats = SufficientStatistics.from_responsibilities(Zk, resp)
                if (stats.count < 2).any():
                    raise DataError(f"a mixture component of class {self.classes_[k]!r} lost its samples "
                                    "during EM; lower n_components_per_class or raise reg_covar")
                count, mean, scatter, quartic = stats.centered()
                _, precisions, log_dets, _ = self._covariances(count, mean, scatter, quartic, owners)
                geo = certificates.MixtureGeometry(np.arange(M), np.log(count / len(Zk)), mean,
                                                   precisions, log_dets, self._structure())
                half = geo.component_terms(Zk)[0] / 2
                half = np.exp(half - half.max(axis=1, keepdims=True))
                resp = half / half.sum(axis=1, keepdims=True)
            resps.append(resp)
        parts = [SufficientStatistics.from_responsibilities(Z[idx == k], r) for k, r in enumerate(resps)]
        count = np.concatenate([p.count for p in parts])
        _, mean, scatter, quartic = SufficientStatistics(
            np.arange(len(count)), count, *(np.concatenate([getattr(p, a) for p in parts])
                                            for a in ("reference", "sum", "outer", "cubic", "quartic"))).centered()
        component_class = np.repeat(np.arange(K), M)
        class_count = np.bincount(component_class, weights=count)
        log_weights = np.log(self.priors_[component_class]) + np.log(count / class_count[component_class])
        self._set_components(component_class, log_weights, count, mean, scatter, quartic)

    # --------------------------------------------------------------- inference
    def _check_latents(self, Z):
        check_is_fitted(self)
        if not hasattr(self, "_geometry"):
            short = self.classes_[self.statistics_.count < 2].tolist()
            raise DataError(f"classes {short} have fewer than 2 samples so far; partial_fit more data")
        try:
            return validate_data(self, Z, reset=False, dtype=np.float64)
        except ValueError as exc:
            raise DataError(str(exc)) from exc

    def _class_scores(self, Z):
        geo = self._geometry
        rows = max(64, 2 ** 21 // (len(geo.means) * Z.shape[1]))
        return np.concatenate([geo.class_scores(geo.component_terms(Z[i:i + rows])[0])
                               for i in range(0, len(Z), rows)]) if len(Z) else np.empty((0, len(self.classes_)))

    def class_scores(self, Z):
        """Class scores ``s_k`` (BRIEF §2), shape (n, K) for every K (also K = 2)."""
        return self._class_scores(self._check_latents(Z))

    def decision_function(self, Z):
        """The scores ``s_k``, shape (n, K); for two classes scikit-learn's (n,) ``s_1 - s_0``."""
        scores = self.class_scores(Z)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict_log_proba(self, Z):
        half = self._class_scores(self._check_latents(Z)) / 2
        top = half.max(axis=1, keepdims=True)
        return half - top - np.log(np.exp(half - top).sum(axis=1, keepdims=True))

    def predict_proba(self, Z):
        """Posterior class probabilities ``softmax(s / 2)``, shape (n, K)."""
        return np.exp(self.predict_log_proba(Z))

    def predict(self, Z):
        """Labels ``(n,)`` of the exact head: the float argmax, and where the top margin is within
        the scores' rounding bound, the exact decision (:mod:`gmcert.latent.exact_decision`), so
        that the prediction is the one the certificates are about, also next to a boundary."""
        Z = self._check_latents(Z)
        geo = self._geometry
        rows = max(64, 2 ** 21 // (len(geo.means) * max(Z.shape[1], 1)))
        out = [exact_decisions(geo, Z[i:i + rows], *geo.component_terms(Z[i:i + rows])[:2])
               for i in range(0, len(Z), rows)]
        return self.classes_[np.concatenate(out) if out else np.empty(0, dtype=np.intp)]

    def score(self, Z, y, sample_weight=None):
        """Accuracy; DataError for labels not seen at fit."""
        check_is_fitted(self)
        label_indices(self.classes_, np.asarray(y).ravel())
        return super().score(Z, y, sample_weight=sample_weight)

    def class_log_likelihood(self, Z):
        """``log p(z | class k)``, the normalised class density, shape (n, K), float64."""
        d = self.n_features_in_
        scores = self._class_scores(self._check_latents(Z))
        return scores / 2 - np.log(self.priors_) - d / 2 * np.log(2 * np.pi)

    def certify(self, Z, method="exact", return_direction=False, n_jobs=None, return_exact=False):
        """Predicted labels and certified latent L2 radii (see :func:`gmcert.latent.certificates.certify`,
        which also documents ``return_direction``, ``n_jobs`` and ``return_exact``).

        Returns ``(labels (n,), radius (n,) float64)``, plus unit directions ``(n, d)`` with
        ``return_direction=True``, plus ``exact (n,) bool`` with ``return_exact=True`` (in that
        order): True where the radius is the exact one, not only a sound lower bound. With several
        components per class the radii are the sound shifted-margin bound (never exact).
        """
        Z = self._check_latents(Z)
        out = certificates.certify(self._geometry, Z, method, return_direction=return_direction, n_jobs=n_jobs,
                                   return_exact=return_exact)
        return (self.classes_[out[0]],) + tuple(out[1:])

    def sample(self, n, random_state=None):
        """Draw ``(Z (n, d) float64, labels (n,))`` from the fitted mixture."""
        check_is_fitted(self)
        rng = check_random_state(random_state)
        comp = rng.choice(len(self.component_class_), size=int(n), p=np.exp(self.component_log_weights_))
        Z = np.empty((int(n), self.n_features_in_))
        for m in np.unique(comp):
            rows = np.flatnonzero(comp == m)
            chol = np.linalg.cholesky(np.linalg.inv(self.component_precisions_[m]))
            Z[rows] = self.component_means_[m] + rng.standard_normal((len(rows), Z.shape[1])) @ chol.T
        return Z, self.classes_[self.component_class_[comp]]

    # ------------------------------------------------------------- model files
    def save(self, path):
        """Write the fitted model to ``path`` (.npz + JSON metadata, no pickle; see gmcert.latent.modelio)."""
        from gmcert.latent import modelio

        check_is_fitted(self, "component_precisions_")
        modelio.save_classifier(self, path)

    @classmethod
    def load(cls, path):
        """Read a model written by :meth:`save`; ModelFileError names what is wrong otherwise."""
        from gmcert.latent import modelio

        return modelio.load_classifier(cls, path)

"""How far the latents are from the fitted Gaussian mixture, and what that costs the certificate.

Let P be the true joint law of (latent z, label y) and Q the fitted mixture: Q(z, y) = pi_y N_y(z),
with N_y the class's Gaussian (or its mixture of Gaussians). For any event A, e.g.
A_r = {(z, y): the head predicts y at z and certifies radius >= r}, Pinsker's inequality gives
|P(A) - Q(A)| <= TV(P, Q) <= sqrt(eps / 2) with eps = KL(P || Q), hence

    CertAcc_P(r) >= CertAcc_Q(r) - sqrt(eps / 2)                                  (BRIEF §5)

Joint KL. Writing P(z, y) = p_y P_y(z) with p the true class proportions,

    KL(P || Q) = sum_y p_y E_{P_y}[log p_y P_y(z) - log pi_y N_y(z)]
               = sum_y p_y KL(P_y || N_y) + KL(p || pi),

so eps weights the per-class divergences by the class proportions and adds the divergence of the
label marginals, which vanishes when the fitted priors equal the data's class frequencies.
Per class, KL(P_k || N_k) = -h(P_k) - E_{P_k} log N_k(z): the second term is a sample mean of the
model's ``class_log_likelihood``, the entropy h a Kozachenko–Leonenko k-NN estimate
(:mod:`gmcert.mismatch.entropy`).

Read the numbers with care. k-NN entropy estimators are biased, and badly so in high dimension
(d beyond about 10): estimate eps on a projected latent (e.g. PCA to a few dimensions). The bias
is reduced by whitening and by a reference correction (the estimator's bias measured on samples
of a density fitted to the class, see :mod:`gmcert.mismatch.entropy`), which removes most of it in the
tested cases (d <= 8) but is not a guarantee. The bootstrap resamples the per-point terms; it
reflects sampling noise, not residual bias, so the upper end of eps's interval is a plausible
upper value, not a certified one (coverage was 95-100% on Gaussian data, d = 4, n_k = 2000). On
the training set eps comes out slightly low (in-sample log-likelihood is optimistic); held-out
latents are better. A class whose latents span fewer than d dimensions has KL = +inf (P_k is
singular with respect to any Gaussian), and the bound is vacuous.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from gmcert.atomic import save_figure
from gmcert.mismatch import bounds
from gmcert.mismatch.entropy import covariance_rank, knn_entropy_terms, reference_bias_terms
from gmcert.mismatch.checks import check_report_inputs
from gmcert.mismatch.normality import mardia_test
from gmcert.smoothing.stats import hoeffding_interval



def _certified_accuracy(scores: np.ndarray, radii) -> np.ndarray:
    """Mean of ``correct & radius >= r`` for each r; ``scores`` holds the radius, -inf when wrong."""
    radii = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    ordered = np.sort(scores)
    return 1.0 - np.searchsorted(ordered, radii, side="left") / len(ordered)


def _radius_scores(model, Z, y) -> np.ndarray:
    """Exact latent radius where the prediction is right, -inf where wrong (or NaN: never certify)."""
    pred, radius = model.certify(Z, method="exact")
    radius = np.asarray(radius, dtype=np.float64)
    return np.where((np.asarray(pred) == np.asarray(y)) & ~np.isnan(radius), radius, -np.inf)


def _json_float(value):
    value = float(value)
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else None)


@dataclass
class MismatchReport:
    """Mismatch between the latents and the fitted mixture; see the module docstring.

    Attributes
    ----------
    classes : ndarray of shape (K,)
    n_per_class : ndarray of shape (K,)
    class_proportions, priors : ndarray of shape (K,)
        Data frequencies p and fitted priors pi.
    kl_per_class : ndarray of shape (K,)
        KL(P_k || N_k) estimates in nats (+inf for a rank-deficient class). Small negative values
        are estimation noise: KL itself is >= 0.
    kl_per_class_interval : ndarray of shape (K, 2)
        Percentile bootstrap interval at level 1 - alpha.
    kl : float
        Joint eps = sum_k p_k KL_k + KL(p || pi).
    kl_interval : tuple (lo, hi)
    label_kl : float
        KL(p || pi) of the label marginals.
    mardia : list of dict
        Per class: ``class`` and the keys of :func:`mardia_test`.
    """

    classes: np.ndarray
    n_per_class: np.ndarray
    class_proportions: np.ndarray
    priors: np.ndarray
    kl_per_class: np.ndarray
    kl_per_class_interval: np.ndarray
    kl: float
    kl_interval: tuple
    label_kl: float
    mardia: list
    dimension: int
    settings: dict
    q_scores: np.ndarray = field(repr=False)
    empirical_scores: np.ndarray = field(repr=False)
    #: held-out evidence (:func:`gmcert.mismatch.bounds.heldout_evidence`): KL lower bounds,
    #: cross-entropy, the Clopper-Pearson certified accuracy; printed first when present
    heldout: dict | None = field(default=None, repr=False)

    def certified_accuracy_q(self, radii):
        """CertAcc under the fitted mixture Q, estimated from ``n_q_samples`` draws of Q.

        Returns
        -------
        estimate, lower, upper : ndarrays of shape (len(radii),)
            Two-sided Hoeffding interval at level 1 - alpha. The same width holds simultaneously
            over all radii by the Dvoretzky–Kiefer–Wolfowitz inequality with Massart's constant,
            because the curve is the survival function of one variable (the radius, -inf when
            the prediction is wrong).
        """
        estimate = _certified_accuracy(self.q_scores, radii)
        return (estimate, *hoeffding_interval(estimate, len(self.q_scores), self.settings["alpha"]))

    def certified_accuracy_bound(self, radii, conservative: bool = True) -> np.ndarray:
        """Lower bound on CertAcc_P(r) = CertAcc_Q(r) - sqrt(eps / 2), clipped at 0.

        ``conservative=True`` (default) uses the LOWER end of CertAcc_Q's Hoeffding interval and
        the UPPER end of eps's bootstrap interval (each one-sided at level 1 - alpha/2, so both
        hold together with probability >= 1 - alpha as far as the bootstrap is right), raised to
        the held-out lower bound on eps where there is one.
        ``conservative=False`` plugs in the point estimates. Negative eps counts as 0.
        """
        estimate, lower, _ = self.certified_accuracy_q(radii)
        acc, eps = (lower, self.kl_interval[1]) if conservative else (estimate, self.kl)
        if self.heldout is not None:  # eps is at least its held-out lower bound (k-NN runs low in high d)
            eps = max(eps, self.heldout["kl_lower"]["joint"])
        return np.maximum(acc - math.sqrt(max(eps, 0.0) / 2.0), 0.0)

    def empirical_certified_accuracy(self, radii) -> np.ndarray:
        """Fraction of the given (Z, y) predicted correctly with exact latent radius >= r."""
        return _certified_accuracy(self.empirical_scores, radii)

    def default_radii(self, n_radii: int = 25) -> np.ndarray:
        """0 up to the largest finite radius certified on the data (or under Q)."""
        finite = np.concatenate([self.empirical_scores, self.q_scores])
        finite = finite[np.isfinite(finite)]
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        return np.linspace(0.0, top, n_radii)

    def to_dict(self, radii=None) -> dict:
        """JSON-serialisable summary (``json.dumps(..., allow_nan=False)`` works; infinities are
        the strings ``"inf"``/``"-inf"``), including the three curves at ``radii``."""
        radii = self.default_radii() if radii is None else np.atleast_1d(np.asarray(radii, float))
        q, q_lo, q_hi = self.certified_accuracy_q(radii)
        floats = lambda a: [_json_float(v) for v in np.ravel(a)]  # noqa: E731
        return {
            "classes": [c.item() if isinstance(c, np.generic) else c for c in self.classes],
            "dimension": int(self.dimension),
            "n_per_class": [int(v) for v in self.n_per_class],
            "class_proportions": floats(self.class_proportions), "priors": floats(self.priors),
            "kl_per_class": floats(self.kl_per_class),
            "kl_per_class_interval": [floats(row) for row in self.kl_per_class_interval],
            "kl": _json_float(self.kl), "kl_interval": floats(self.kl_interval),
            "label_kl": _json_float(self.label_kl),
            "mardia": [{key: (_json_float(v) if isinstance(v, float) else
                              (v.item() if isinstance(v, np.generic) else v))
                        for key, v in record.items()} for record in self.mardia],
            "settings": dict(self.settings),
            "radii": floats(radii),
            "certified_accuracy_empirical": floats(self.empirical_certified_accuracy(radii)),
            "certified_accuracy_q": floats(q), "certified_accuracy_q_lower": floats(q_lo),
            "certified_accuracy_q_upper": floats(q_hi),
            "certified_accuracy_bound": floats(self.certified_accuracy_bound(radii)),
            "certified_accuracy_bound_point": floats(self.certified_accuracy_bound(radii, False)),
            "heldout": None if self.heldout is None else bounds.evidence_dict(self.heldout, radii,
                                                                              self.settings["alpha"]),
        }

    def table(self) -> str:
        """Readable per-class table: class, n, KL [lo, hi], Mardia skewness and kurtosis p. With held-out
        evidence: first the sound certified-accuracy statement, then the classes ranked by their KL
        lower bound, and the model-based bound beside it; no KL is printed negative."""
        if self.heldout is not None:
            return self._heldout_table()
        level = 100 * (1 - self.settings["alpha"])
        lines = [f"{'class':>8} {'n':>6}  {'KL (nats) [' + format(level, 'g') + '% bootstrap]':<32}"
                 f"{'skew p':>10} {'kurt p':>10}"]
        for j, c in enumerate(self.classes):
            lo, hi = self.kl_per_class_interval[j]
            kl = f"{self.kl_per_class[j]:.4g} [{lo:.4g}, {hi:.4g}]"
            rec = self.mardia[j]
            lines.append(f"{str(c):>8} {self.n_per_class[j]:>6}  {kl:<32}"
                         f"{rec['skewness_p']:>10.3g} {rec['kurtosis_p']:>10.3g}")
        eps = f"{self.kl:.4g} [{self.kl_interval[0]:.4g}, {self.kl_interval[1]:.4g}]"
        lines.append(f"{'joint':>8} {int(self.n_per_class.sum()):>6}  {eps:<32}"
                     f"(label KL {self.label_kl:.3g}; d={self.dimension}, k={self.settings['k']})")
        flat = [f"{c} (rank {rec['rank']})"
                for c, rec, kl in zip(self.classes, self.mardia, self.kl_per_class) if np.isinf(kl)]
        if flat:
            lines.append(f"KL = inf: latents span fewer than d={self.dimension} dimensions in classes "
                         f"{', '.join(flat[:10])}{' ...' if len(flat) > 10 else ''}; project them first")
        return "\n".join(lines)

    def _heldout_table(self) -> str:
        alpha, radii = self.settings["alpha"], self.default_radii(9)
        lines = bounds.statement_lines(self.heldout, radii, alpha) + [""]
        lines += bounds.class_lines(self.heldout, self.classes, self.kl_per_class, self.kl_per_class_interval,
                                    self.mardia, alpha)
        lower = self.heldout["kl_lower"]["joint"]
        lines.append(f"{'joint':>8} {self.heldout['n']:>7} {lower:>9.3g} {max(self.kl, lower, 0.0):>9.3g}  "
                     f"(label KL {self.label_kl:.3g}; d={self.dimension}, k-NN k={self.settings['k']})")
        model_based = self.certified_accuracy_bound(radii)
        lines += ["", "Model-based (holds only as far as the k-NN eps is right): CertAcc_Q(r) - sqrt(eps/2) = "
                  + ", ".join(f"r={r:.3g}: {b:.3f}" for r, b in zip(radii, model_based))]
        return "\n".join(lines)

    def plot(self, path, radii=None) -> None:
        """PNG with CertAcc on the data, under Q (with its Hoeffding band) and the lower bound."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        radii = self.default_radii() if radii is None else np.atleast_1d(np.asarray(radii, float))
        q, q_lo, q_hi = self.certified_accuracy_q(radii)
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend switch
        ax = fig.add_subplot()
        if self.heldout is not None:
            bounds.plot_heldout(ax, self.heldout, radii, self.settings["alpha"])
        else:
            ax.plot(radii, self.empirical_certified_accuracy(radii), label="empirical (data)")
        ax.plot(radii, q, color="C1", label="under fitted mixture Q")
        ax.fill_between(radii, q_lo, q_hi, alpha=0.2, color="C1")
        ax.plot(radii, self.certified_accuracy_bound(radii), "--", color="C3",
                label="model-based bound: Q lower - sqrt(eps_hi/2)")
        ax.set(xlabel="latent L2 radius", ylabel="certified accuracy", ylim=(0, 1.02),
               title=f"eps = {max(self.kl, 0.0):.3g} nats [{max(self.kl_interval[0], 0.0):.3g}, "
                     f"{max(self.kl_interval[1], 0.0):.3g}]" + ("" if self.heldout is None else
                     f", lower bound {self.heldout['kl_lower']['joint']:.3g}"))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, path)

    def __str__(self) -> str:
        return self.table()


def _per_point_kl_terms(model, Z, cls, k, bias_correction, rng):
    """Per-point terms t_i whose class means estimate KL_k, bias terms per class, infinite flags."""
    K, d = len(model.classes_), Z.shape[1]
    log_lik = np.asarray(model.class_log_likelihood(Z), dtype=np.float64)
    terms = np.zeros(len(Z))
    references = [np.zeros(1) for _ in range(K)]
    infinite = np.zeros(K, dtype=bool)
    for j in range(K):
        mask = cls == j
        rank = covariance_rank(Z[mask])
        if rank < d:
            infinite[j] = True
            warnings.warn(f"class {model.classes_[j]}: latents span only {rank} of {d} dimensions, "
                          "so KL(P_k || N_k) = +inf and the bound is vacuous; drop the constant "
                          "directions (e.g. PCA) first", stacklevel=3)
            continue
        # KL_k = -h(P_k) - E log N_k: each entropy term estimates -log p(z_i).
        terms[mask] = -knn_entropy_terms(Z[mask], k=k) - log_lik[mask, j]
        if bias_correction != "none":
            # h_corrected = h_hat - bias, so KL gains +bias.
            references[j] = reference_bias_terms(
                Z[mask], k=k, max_components=1 if bias_correction == "gaussian_reference" else 4,
                random_state=rng.integers(2**63))
    return terms, references, infinite


def _joint_kl(kl_per_class, proportions, priors):
    """eps = sum_k p_k KL_k + KL(p || pi), with 0 * anything = 0 for absent classes."""
    present = proportions > 0
    label_kl = float(np.sum(proportions[present] * np.log(proportions[present] / priors[present])))
    return float(np.sum(proportions[present] * kl_per_class[present])) + label_kl, label_kl


def mismatch_report(model, Z, y, k: int = 10, n_bootstrap: int = 1000, n_q_samples: int = 20000,
                    alpha: float = 0.05, bias_correction: str = "mixture_reference",
                    random_state=None, progress: bool = False, heldout: dict | None = None) -> MismatchReport:
    """Estimate eps = KL(P || Q), run Mardia's tests and compute the certified-accuracy bound.

    Parameters
    ----------
    model : fitted GaussianMixtureClassifier
        Needs ``classes_``, ``priors_``, ``n_features_in_``, ``class_log_likelihood``,
        ``certify(Z, method="exact")`` and ``sample(n, random_state)``.
    Z : array-like of shape (n, d)
        Latents (finite). Prefer held-out latents: on the training set the mean of
        log N_k is optimistic by about (number of parameters per class) / n_k nats, so eps comes
        out low by that much (0.01 for d = 4, n_k = 2000 with full covariances).
    y : array-like of shape (n,)
        Their labels, values of ``model.classes_``; every class needs more than max(k, d) points.
    k : int, default 10
        Neighbour order of the Kozachenko–Leonenko estimator. Larger k lowers the variance and
        raises the bias, which the reference correction then removes; 10 gave the smallest error
        on the test distributions (Gaussian, Student-t, two-mode mixture; d = 4 and 8).
    n_bootstrap : int, default 1000
        Bootstrap resamples of the points (whole data set, so class proportions vary too).
    n_q_samples : int, default 20000
        Draws from the fitted mixture for CertAcc_Q.
    alpha : float, default 0.05
        Level of every interval: bootstrap percentile (alpha/2, 1 - alpha/2), Hoeffding.
    bias_correction : {"mixture_reference", "gaussian_reference", "none"}, default "mixture_reference"
        Subtract the k-NN estimator's bias measured on samples of a density fitted to each class
        (a Gaussian mixture of 1-4 components chosen by BIC, or one Gaussian; see
        :func:`gmcert.mismatch.entropy.reference_bias_terms`). A parametric-bootstrap correction: it removes
        most of the bias when the reference resembles the class, nothing guarantees it otherwise.
        The reference's own noise is resampled in the bootstrap.
    random_state : int, Generator or None
        Seeds the bootstrap, the reference samples, Mardia's subsample and the draws from Q.
    progress : bool, default False
        Show a tqdm bar over the bootstrap resamples.
    heldout : dict, optional
        :func:`gmcert.mismatch.bounds.heldout_evidence` of held-out latents: the sound statements.

    Returns
    -------
    MismatchReport
    """
    Z, cls, n_per_class = check_report_inputs(model, Z, y, k, n_bootstrap, n_q_samples, alpha, bias_correction)
    rng = np.random.default_rng(random_state)
    n, d = Z.shape
    K = len(model.classes_)
    priors = np.asarray(model.priors_, dtype=np.float64)
    proportions = n_per_class / n
    terms, references, infinite = _per_point_kl_terms(model, Z, cls, k, bias_correction, rng)

    kl_per_class = np.array([terms[cls == j].mean() + references[j].mean() for j in range(K)])
    kl_per_class[infinite] = np.inf
    kl, label_kl = _joint_kl(kl_per_class, proportions, priors)

    boot_kl = np.empty((n_bootstrap, K))
    boot_eps = np.empty(n_bootstrap)
    for b in tqdm(range(n_bootstrap), desc="bootstrap", disable=not progress):
        idx = rng.integers(0, n, n)
        counts = np.bincount(cls[idx], minlength=K)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_kl[b] = np.bincount(cls[idx], weights=terms[idx], minlength=K) / counts
        boot_kl[b] += [ref[rng.integers(0, len(ref), len(ref))].mean() for ref in references]
        boot_kl[b, infinite] = np.inf
        boot_eps[b] = _joint_kl(np.nan_to_num(boot_kl[b], nan=0.0, posinf=np.inf), counts / n, priors)[0]
    quantiles = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    # Percentiles of arrays holding +inf would interpolate inf - inf; an infinite class is (inf, inf).
    kl_per_class_interval = np.full((K, 2), np.inf)
    if not infinite.all():
        kl_per_class_interval[~infinite] = np.nanpercentile(boot_kl[:, ~infinite], quantiles, axis=0).T
    kl_interval = (math.inf, math.inf) if infinite.any() else tuple(
        float(v) for v in np.percentile(boot_eps, quantiles))

    mardia = [{"class": c.item() if isinstance(c, np.generic) else c,
               **mardia_test(Z[cls == j], random_state=rng.integers(2**63))}
              for j, c in enumerate(model.classes_)]
    Zq, yq = model.sample(n_q_samples, random_state=int(rng.integers(2**31)))
    return MismatchReport(
        classes=np.asarray(model.classes_), n_per_class=n_per_class, class_proportions=proportions,
        priors=priors, kl_per_class=kl_per_class, kl_per_class_interval=kl_per_class_interval,
        kl=kl, kl_interval=kl_interval, label_kl=label_kl, mardia=mardia, dimension=d,
        settings={"k": int(k), "n_bootstrap": int(n_bootstrap), "n_q_samples": int(n_q_samples),
                  "alpha": float(alpha), "bias_correction": bias_correction},
        q_scores=_radius_scores(model, Zq, yq), empirical_scores=_radius_scores(model, Z, y), heldout=heldout)

"""What held-out latents can state soundly about the mixture, in any dimension.

Three statements, each from data the head was not fitted on:

1. **Certified accuracy, Clopper-Pearson.** The closed-form certificate is a deterministic function
   of the input, so on n held-out pairs the count of inputs predicted right with radius >= r is
   Binomial(n, CertAcc_P(r)); its one-sided Clopper-Pearson bound at level alpha is a lower
   confidence bound on the certified accuracy on the data distribution at that r (pointwise in r),
   with no assumption on P at all (:func:`certified_accuracy_lower`). This is the statement users can
   rely on; CertAcc_Q(r) - sqrt(eps / 2) beside it is model-based.
2. **Held-out cross-entropy** -E_P log N_k(z), per class: an unbiased sample mean. KL(P_k || N_k) =
   -h(P_k) + CE_k, and h does not depend on the head, so differences of CE between candidate heads
   are unbiased estimates of differences of KL (:mod:`gmcert.latent.selection` uses this).
3. **A lower confidence bound on KL** (:func:`kl_lower_bounds`). Donsker-Varadhan: for any bounded
   T, KL(P || N) >= E_P[T] - log E_N[exp T]. Each class's held-out latents are split in two halves:
   on half A a witness is fitted, T = clip(f(u), -c, c), with u the class's own log-density log N_k(z)
   (a one-dimensional statistic, so by data processing its law already carries part of the KL),
   f a logistic regression of A against draws of N_k on (u, u^2) (its logit estimates log dP/dN of
   u), and c chosen on A. T is then fixed: on half B, Hoeffding's inequality lower-bounds E_P[T] at
   level alpha/2 (range 2c, n_B points); E_N[exp T] is known, since N_k is: for one Gaussian u is an
   affine function of a chi2(d) variable, so it is a 1-D integral (an upper Riemann sum bounds it);
   a class with several components is sampled, with Hoeffding at level alpha/2 (split over the
   classes). The difference is a lower bound on KL with probability >= 1 - alpha,
   whatever P is; it is clipped at 0 (KL >= 0). The joint bound uses T(z, y) = T_y(z) on all halves B
   against draws of the mixture Q(z, y) = pi_y N_y(z). Per-class bounds are each at level alpha (not
   simultaneous over classes).

No upper bound on KL is given: none exists without assumptions on P.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import t as student_t

from gmcert.errors import DataError
from gmcert.smoothing.stats import clopper_pearson_lower, clopper_pearson_upper

#: clip levels tried for the witness; the one with the best bound on half A is used on half B
CLIPS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: grid points of the upper Riemann sum of E_N[exp T] (its excess over the integral is about 1e-4)
GRID = 20_001
#: fewest held-out points in a class for a KL bound (2 per half)
MIN_POINTS = 4


def certified_accuracy_lower(correct, radius, radii, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``(empirical, lower)`` certified accuracy at each of ``radii`` from held-out certificates:
    ``correct`` (bool) and ``radius`` (a sound radius; NaN or a wrong prediction counts as not
    certified). ``lower`` is the one-sided Clopper-Pearson bound at level alpha, pointwise in r."""
    correct = np.asarray(correct, dtype=bool)
    radius = np.nan_to_num(np.asarray(radius, dtype=np.float64), nan=-np.inf)
    if correct.shape != radius.shape or correct.ndim != 1 or len(correct) == 0:
        raise DataError(f"need matching non-empty 1-D correct and radius, got {correct.shape} and {radius.shape}")
    counts = np.array([int(np.sum(correct & (radius >= r))) for r in np.atleast_1d(radii)])
    return counts / len(correct), np.asarray(clopper_pearson_lower(counts, len(correct), alpha), dtype=np.float64)


def heldout_cross_entropy(model, Z, y, alpha: float = 0.05) -> dict:
    """Per class and joint: -mean log N_k(z) over held-out points of class k (nats), with a t interval."""
    Z, y = np.asarray(Z, dtype=np.float64), np.asarray(y)
    loglik = model.class_log_likelihood(Z)
    own = loglik[np.arange(len(y)), np.searchsorted(model.classes_, y)]
    out = {"per_class": [], "interval": []}
    for c in model.classes_:
        values = -own[y == c]
        out["per_class"].append(float(values.mean()) if len(values) else math.nan)
        out["interval"].append(_t_interval(values, alpha))
    out["joint"], out["joint_interval"] = float(-own.mean()), _t_interval(-own, alpha)
    return out


def _t_interval(values, alpha):
    if len(values) < 2:
        return (math.nan, math.nan)
    half = student_t.ppf(1 - alpha / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return (float(values.mean() - half), float(values.mean() + half))


def _hoeffding(n: int, width: float, delta: float) -> float:
    """One-sided Hoeffding slack of a mean of n values in a range of ``width``, at level delta."""
    return width * math.sqrt(math.log(1 / delta) / (2 * n))


class _Witness:
    """T(z) = clip(a + b v + c2 v^2, -clip, clip), v the standardised class log-density."""

    def __init__(self, real_u, model_u):
        from sklearn.linear_model import LogisticRegression

        self.mu, self.sd = float(model_u.mean()), float(model_u.std()) or 1.0
        X = np.vstack([self._features(real_u), self._features(model_u)])
        labels = np.r_[np.ones(len(real_u)), np.zeros(len(model_u))]
        # balanced classes: the logit estimates log dP/dN of u, not the sample ratio
        self.fit = LogisticRegression(class_weight="balanced", C=1.0, solver="newton-cholesky").fit(X, labels)
        self.clip = CLIPS[-1]

    def _features(self, u):
        v = (np.asarray(u) - self.mu) / self.sd
        return np.column_stack([v, v * v])

    def __call__(self, u, clip=None):
        c = self.clip if clip is None else clip
        return np.clip(self.fit.decision_function(self._features(u)), -c, c)


class _ClassLaw:
    """The law of u = log N_k(z) under N_k itself, which T's expectation under the model needs.

    For one Gaussian, u = a - s / 2 with a the log-density at the mean and s ~ chi2(d) exactly, so
    E_N[exp T(u)] is a one-dimensional integral, bounded above by an upper Riemann sum on a fine
    grid plus the far tail (no sampling). A class with several components is sampled instead, and
    Hoeffding's slack is added.
    """

    def __init__(self, model, k, rng, n_model):
        self.d = int(model.n_features_in_)
        comps = np.flatnonzero(np.asarray(model.component_class_) == k)
        self.exact = len(comps) == 1
        if self.exact:
            mean = np.asarray(model.component_means_)[comps[0]][None]
            self.a = float(model.class_log_likelihood(mean)[0, k])
            self.fit_u = self.a - rng.chisquare(self.d, 5000) / 2
        else:
            draws, labels = model.sample(int(n_model) * len(model.classes_), random_state=rng.integers(2 ** 31))
            u = model.class_log_likelihood(draws[labels == model.classes_[k]])[:, k]
            self.fit_u, self.bound_u = u[: len(u) // 4][:5000], u[len(u) // 4:]

    def upper_exp(self, witness, clip, delta) -> float:
        """An upper bound on E_N[exp T] (at level delta where sampled)."""
        if not self.exact:
            values = np.exp(witness(self.bound_u, clip))
            return float(values.mean() + _hoeffding(len(values), math.exp(clip) - math.exp(-clip), delta))
        from scipy.stats import chi2

        # An upper Riemann sum, which is sound: T(a - s/2) is a clipped quadratic in s, monotone
        # between its vertex and the grid points, so on each cell its maximum is at an end.
        top = float(chi2.ppf(1 - 1e-12, self.d))
        grid = np.linspace(0.0, top, GRID)
        b1, b2 = witness.fit.coef_[0]
        if b2 != 0:
            vertex = 2 * (self.a - (witness.mu - b1 / (2 * b2) * witness.sd))
            grid = np.sort(np.r_[grid, vertex]) if 0 < vertex < top else grid
        values = np.exp(witness(self.a - grid / 2, clip))
        mass = np.diff(chi2.cdf(grid, self.d))
        return float(np.sum(np.maximum(values[:-1], values[1:]) * mass) + math.exp(clip) * chi2.sf(top, self.d))


def _dv_lower(T_real, upper_exp, clip, delta):
    """E_P[T] lower (Hoeffding, level delta, range 2 clip) minus log of the upper bound on E_N[exp T]."""
    return float(T_real.mean() - _hoeffding(len(T_real), 2 * clip, delta) - math.log(upper_exp))


def kl_lower_bounds(model, Z, y, alpha: float = 0.05, n_model: int = 100_000, random_state=0) -> dict:
    """Lower confidence bounds on KL(P_k || N_k) per class and on the joint KL(P || Q) (module
    docstring, statement 3), from held-out latents ``Z`` with labels ``y``; each holds with
    probability >= 1 - alpha. Classes with fewer than ``MIN_POINTS`` held-out points get 0.
    ``n_model``: draws per class where a class's law must be sampled (several components).

    The held-out set is split at random into halves A and B as a whole (not class by class), so
    that B is itself an i.i.d. sample of P(z, y) for the joint bound.

    Returns ``{"per_class": (K,), "joint": float, "clip": (K,), "n_eval": (K,)}``.
    """
    rng = np.random.default_rng(random_state)
    Z, y = np.asarray(Z, dtype=np.float64), np.asarray(y)
    K, delta = len(model.classes_), alpha / 2
    u = model.class_log_likelihood(Z)[np.arange(len(y)), np.searchsorted(model.classes_, y)] if len(y) \
        else np.zeros(0)
    in_b = np.zeros(len(y), dtype=bool)
    in_b[rng.permutation(len(y))[: len(y) - len(y) // 2]] = True
    per_class, clips, n_eval = np.zeros(K), np.full(K, np.nan), np.zeros(K, dtype=int)
    witnesses, laws = {}, {}
    for k, c in enumerate(model.classes_):
        half_a, half_b = u[(y == c) & ~in_b], u[(y == c) & in_b]
        if min(len(half_a), len(half_b)) < MIN_POINTS // 2:
            continue
        law = _ClassLaw(model, k, rng, n_model)
        witness = _Witness(half_a, law.fit_u)
        # the clip level: the best bound half A gives (half B unseen), with half B's slack
        witness.clip = max(CLIPS, key=lambda cl: float(witness(half_a, cl).mean()
                                                        - _hoeffding(len(half_b), 2 * cl, delta)
                                                        - math.log(np.exp(witness(law.fit_u, cl)).mean())))
        per_class[k] = max(0.0, _dv_lower(witness(half_b), law.upper_exp(witness, witness.clip, delta / K),
                                          witness.clip, delta))
        clips[k], n_eval[k] = witness.clip, len(half_b)
        witnesses[k], laws[k] = witness, law
    joint = 0.0
    if witnesses and in_b.any():
        # T(z, y) = T_y(z), 0 for a class without a witness; E_Q[exp T] = sum_y pi_y E_{N_y}[exp T_y]
        T_real = np.zeros(int(in_b.sum()))
        y_b, u_b = y[in_b], u[in_b]
        priors = np.asarray(model.priors_, dtype=np.float64)
        upper = float(sum(priors[k] for k in range(K) if k not in witnesses))
        for k, witness in witnesses.items():
            T_real[y_b == model.classes_[k]] = witness(u_b[y_b == model.classes_[k]])
            upper += priors[k] * laws[k].upper_exp(witness, witness.clip, delta / K)
        joint = max(0.0, _dv_lower(T_real, upper, max(w.clip for w in witnesses.values()), delta))
    return {"per_class": per_class, "joint": joint, "clip": clips, "n_eval": n_eval}


def heldout_evidence(model, Z, y, alpha: float = 0.05, random_state=0, inputs: dict | None = None) -> dict:
    """Everything held-out latents state soundly (module docstring): KL lower bounds, cross-entropy,
    and the latent certificates' scores (exact latent radius where right, -inf where wrong) for the
    Clopper-Pearson curve. ``inputs``: the deployed input-space certificates of the same held-out
    inputs, ``{"correct", "radius", "kind"}`` (from the pipeline), printed first when given."""
    Z, y = np.asarray(Z, dtype=np.float64), np.asarray(y)
    if len(y) == 0:
        raise DataError("no held-out latents: the model's held-out split is empty (fit with --test-size > 0)")
    pred, radius = model.certify(Z, method="exact")
    radius = np.asarray(radius, dtype=np.float64)
    scores = np.where((np.asarray(pred) == y) & ~np.isnan(radius), radius, -np.inf)
    return {"kl_lower": kl_lower_bounds(model, Z, y, alpha, random_state=random_state),
            "cross_entropy": heldout_cross_entropy(model, Z, y, alpha), "n": int(len(y)),
            "n_per_class": [int(np.sum(y == c)) for c in model.classes_], "scores": scores, "inputs": inputs}


def statement_lines(evidence: dict, radii, alpha: float) -> list[str]:
    """The sound statement, as printed first by ``gmcert diagnose``."""
    level = f"{100 * (1 - alpha):g}%"
    lines = [f"Held-out certified accuracy, {evidence['n']} inputs the head was not fitted on, with its "
             f"one-sided {level} Clopper-Pearson lower bound (sound, no assumption on the data):"]
    inputs = evidence.get("inputs")
    head = f"{'radius':>8}  {'latent: acc [lower]':>22}"
    if inputs is not None:
        head += f"  {'input (' + inputs['kind'] + '): acc [lower]':>30}"
    lines.append(head)
    latent = certified_accuracy_lower(np.isfinite(evidence["scores"]), evidence["scores"], radii, alpha)
    deployed = certified_accuracy_lower(inputs["correct"], inputs["radius"], radii, alpha) if inputs else None
    for j, r in enumerate(radii):
        row = f"{r:>8.3g}  {latent[0][j]:>12.3f} [{latent[1][j]:.3f}]"
        if deployed is not None:
            row += f"  {deployed[0][j]:>20.3f} [{deployed[1][j]:.3f}]"
        lines.append(row)
    return lines


def class_lines(evidence: dict, classes, knn, knn_interval, mardia, alpha: float) -> list[str]:
    """Per class, ranked by the KL lower bound: held-out cross-entropy, the bound, a point estimate
    never below it (nor below 0), the k-NN estimate's bootstrap interval clipped at 0, Mardia p."""
    bound, ce = evidence["kl_lower"], evidence["cross_entropy"]
    level = f"{100 * (1 - alpha):g}%"
    lines = [f"KL(P_k || N_k) in nats: lower bound at {level} (Donsker-Varadhan on held-out halves), a point "
             "estimate (k-NN, raised to the bound), and held-out cross-entropy -E log N_k:",
             f"{'class':>8} {'n held':>7} {'KL lower':>9} {'KL point':>9} {'k-NN [' + level + ' bootstrap]':>24}"
             f" {'cross-entropy [' + level + ']':>30} {'skew p':>9} {'kurt p':>9}"]
    order = np.argsort(-np.asarray(bound["per_class"]), kind="stable")
    for j in order:
        lower = bound["per_class"][j]
        point = max(float(knn[j]), lower, 0.0)
        lo, hi = (max(float(v), 0.0) for v in knn_interval[j])
        c_lo, c_hi = ce["interval"][j]
        lines.append(f"{str(classes[j]):>8} {evidence['n_per_class'][j]:>7} {lower:>9.3g} {point:>9.3g} "
                     f"{'[' + format(lo, '.3g') + ', ' + format(hi, '.3g') + ']':>24} "
                     f"{format(ce['per_class'][j], '.4g') + ' [' + format(c_lo, '.4g') + ', ' + format(c_hi, '.4g') + ']':>30}"
                     f" {mardia[j]['skewness_p']:>9.3g} {mardia[j]['kurtosis_p']:>9.3g}")
    return lines


def plot_heldout(ax, evidence: dict, radii, alpha: float) -> None:
    """The held-out latent certified accuracy and its Clopper-Pearson band on ``ax``."""
    scores = evidence["scores"]
    acc, lower = certified_accuracy_lower(np.isfinite(scores), scores, radii, alpha)
    n = len(scores)
    upper = clopper_pearson_upper(np.round(acc * n), n, alpha)
    ax.plot(radii, acc, color="C0", label=f"held-out data ({n} inputs)")
    ax.fill_between(radii, lower, upper, color="C0", alpha=0.2, label=f"Clopper-Pearson {100 * (1 - alpha):g}%")


def evidence_dict(evidence: dict, radii, alpha: float) -> dict:
    """JSON-able held-out evidence (for mismatch.json)."""
    acc, lower = certified_accuracy_lower(np.isfinite(evidence["scores"]), evidence["scores"], radii, alpha)
    out = {"n": evidence["n"], "n_per_class": evidence["n_per_class"],
           "kl_lower_per_class": [float(v) for v in evidence["kl_lower"]["per_class"]],
           "kl_lower_joint": float(evidence["kl_lower"]["joint"]),
           "cross_entropy_per_class": evidence["cross_entropy"]["per_class"],
           "cross_entropy_joint": evidence["cross_entropy"]["joint"],
           "latent_certified_accuracy": acc.tolist(), "latent_certified_accuracy_lower": lower.tolist()}
    if evidence.get("inputs") is not None:
        inputs = evidence["inputs"]
        acc, lower = certified_accuracy_lower(inputs["correct"], inputs["radius"], radii, alpha)
        out.update(input_radius_kind=inputs["kind"], input_certified_accuracy=acc.tolist(),
                   input_certified_accuracy_lower=lower.tolist())
    return out

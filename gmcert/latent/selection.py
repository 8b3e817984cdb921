"""Head selection by held-out likelihood: which covariance structure, shrinkage and number of
components per class the latents support (``gmcert fit --select``).

Every candidate head is scored by stratified K-fold cross-validation on the training latents: each
point gets an out-of-fold ``log p(z | its own class)``, and the held-out cross-entropy is minus their
mean. Candidates are compared with the best one point by point (a paired comparison), and the
simplest head that is not significantly worse than the best is chosen.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
from scipy import stats
from sklearn.base import clone
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from threadpoolctl import threadpool_limits

from gmcert.errors import DataError
from gmcert.latent.mixture import GaussianMixtureClassifier

#: the default grid, searched in full unless a class is too small for a combination
COVARIANCE_GRID = ("full", "tied", "diag", "spherical")
SHRINKAGE_GRID = ("ledoit_wolf", None)
COMPONENTS_GRID = (1, 2, 3)
CONFIDENCE = 0.95
#: fewer free parameters first; tied shares one full covariance, so it sits between diag and full
STRUCTURE_ORDER = {"spherical": 0, "diag": 1, "tied": 2, "full": 3}


def default_candidates() -> list[dict]:
    """The default grid: covariance type x shrinkage x components per class (24 heads)."""
    return [{"covariance_type": c, "shrinkage": s, "n_components_per_class": m}
            for m, c, s in itertools.product(COMPONENTS_GRID, COVARIANCE_GRID, SHRINKAGE_GRID)]


def complexity(params: dict) -> tuple:
    """Sort key, simplest first: fewer components per class, then spherical < diag < tied < full,
    then more shrinkage (any shrinkage before none; a larger fixed intensity before a smaller)."""
    s = params.get("shrinkage")
    amount = float(s) if isinstance(s, Real) and not isinstance(s, bool) else None
    unshrunk = s is None or amount == 0
    return (params.get("n_components_per_class", 1), STRUCTURE_ORDER[params.get("covariance_type", "full")],
            unshrunk, -(amount or 0.0))


@dataclass
class SelectionRow:
    """One candidate: its parameters and, unless ``skipped`` says why not, its held-out scores.

    ``difference`` is the mean per-point loss minus the best candidate's (>= 0 up to rounding,
    equal to the difference of cross-entropies); ``interval`` its confidence interval.
    """

    params: dict
    candidate: int  # its position among the candidates given (a column of ``HeadSelection.losses``)
    cross_entropy: float | None = None
    difference: float | None = None
    interval: tuple[float, float] | None = None
    chosen: bool = False
    best: bool = False
    skipped: str | None = None

    @property
    def not_worse(self) -> bool:
        """True when the interval against the best includes 0: not significantly worse."""
        return self.interval is not None and self.interval[0] <= 0

    def to_dict(self) -> dict:
        return {"params": dict(self.params), "candidate": self.candidate, "cross_entropy": self.cross_entropy,
                "difference": self.difference, "interval": None if self.interval is None else list(self.interval),
                "chosen": self.chosen, "best": self.best, "skipped": self.skipped}


@dataclass
class HeadSelection:
    """The outcome of :func:`select_head`: rows in complexity order (simplest first), the chosen
    parameters, and the per-point out-of-fold losses (``losses[i, c]``, candidate ``c`` in the order
    given, NaN where skipped; not saved)."""

    rows: list[SelectionRow]
    chosen: dict
    best: dict
    n_folds: int
    n_points: int
    confidence: float = CONFIDENCE
    losses: np.ndarray | None = field(default=None, repr=False)

    def table(self) -> str:
        """A plain-text table, one row per candidate, and the choice with its reason."""
        pct = f"{100 * self.confidence:g}%"
        lines = [f"head selection: held-out cross-entropy (nats per point, lower is better), stratified "
                 f"{self.n_folds}-fold on {self.n_points} training latents;",
                 f"difference: paired per point against the best, with a {pct} t interval",
                 f"{'comp':>4}  {'covariance':<10}  {'shrinkage':<11}  {'cross-entropy':>13}  {'difference':>10}  "
                 f"{pct + ' interval':<22}  note"]
        for row in self.rows:
            head = (f"{row.params.get('n_components_per_class', 1):>4}  {row.params.get('covariance_type'):<10}  "
                    f"{_shrinkage_name(row.params.get('shrinkage')):<11}  ")
            if row.skipped:
                lines.append(head + f"skipped: {row.skipped}")
                continue
            note = ", ".join(n for n, on in (("best", row.best), ("chosen", row.chosen)) if on)
            interval = f"[{row.interval[0]:+.4f}, {row.interval[1]:+.4f}]"
            scores = f"{row.cross_entropy:>13.4f}  {row.difference:>+10.4f}  {interval:<22}  {note}"
            lines.append((head + scores).rstrip())
        if self.chosen == self.best:
            why = "the best; every simpler head scored is significantly worse"
        else:
            why = (f"the simplest head whose interval includes 0, not significantly worse than the best "
                   f"({_describe(self.best)})")
        lines.append(f"chosen: {_describe(self.chosen)}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able record (no per-point losses)."""
        return {"criterion": "held-out cross-entropy, nats per point", "cv": f"stratified {self.n_folds}-fold",
                "n_folds": self.n_folds, "n_points": self.n_points, "confidence": self.confidence,
                "interval": "t", "chosen": dict(self.chosen), "best": dict(self.best),
                "rows": [row.to_dict() for row in self.rows]}


def _shrinkage_name(s) -> str:
    return "none" if s is None else str(s)


def _describe(params: dict) -> str:
    m = params.get("n_components_per_class", 1)
    return (f"{m} component{'s' if m != 1 else ''} per class, {params.get('covariance_type')}, "
            f"shrinkage {_shrinkage_name(params.get('shrinkage'))}")


def select_head(Z, y, candidates=None, n_folds=5, random_state=0, estimator=None, groups=None) -> HeadSelection:
    """Compare candidate heads by held-out cross-entropy and choose the simplest adequate one.

    Parameters
    ----------
    Z : array (n, d)
        Training latents (never the held-out test split: selection is part of fitting).
    y : array (n,)
        Their labels.
    candidates : list of dict, optional
        Head parameters to compare, e.g. ``{"covariance_type": "tied", "shrinkage": None,
        "n_components_per_class": 2}``; default :func:`default_candidates`. Parameters a candidate
        leaves out are the estimator's.
    n_folds : int >= 2, default 5
    random_state : int, default 0
        Seeds the fold assignment.
    estimator : GaussianMixtureClassifier, optional
        Supplies the parameters the candidates do not set (``reg_covar``, ``random_state`` of
        k-means and EM, ...); default ``GaussianMixtureClassifier(random_state=random_state)``.
    groups : array (n,), optional
        Rows that must share a fold (e.g. noised copies of one input), so that no point is scored
        by a head fitted on a copy of itself.

    Returns
    -------
    HeadSelection

    Notes
    -----
    Loss of point ``i`` under candidate ``c``: ``l_ic = -log p(z_i | y_i)`` from the candidate fitted
    on the folds without ``i`` (class densities, so the priors play no part). Cross-entropy
    ``CE_c = mean_i l_ic``. The best candidate ``b`` has the lowest. For every candidate the
    per-point differences ``d_i = l_ic - l_ib`` give the mean ``CE_c - CE_b`` and the 95% interval
    ``mean +- t_{0.975, n-1} * sd(d) / sqrt(n)`` (Student's t quantile with n - 1 degrees of
    freedom; for hundreds of points it is the normal 1.96 to two decimals). Pairing removes the
    variation shared by all candidates (hard points are hard for every head), so the interval is
    far narrower than one from two separate cross-entropies. It treats the per-point differences as
    independent, which ignores the variation of the fitted heads across folds: read it as a
    guide, not an exact test.

    Choice: the best candidate is the one with the lowest cross-entropy, but a more complex head
    often wins by a margin within noise. Among the candidates whose interval includes 0 (not
    significantly worse than the best, the best included), the simplest is chosen: fewer
    components per class first, then spherical < diag < tied < full, then more shrinkage
    (``ledoit_wolf`` before none); see :func:`complexity`. Simpler heads generalise and certify
    more stably, and a tie is no evidence for the extra parameters.

    Candidates the data cannot support are skipped, and the table says why: a class with fewer
    than ``2 m`` points in some training fold for ``m`` components, or a fit that fails on a fold
    (a singular covariance, an EM component losing its points).
    """
    Z, y, classes, own = _check_data(Z, y, n_folds)
    candidates = default_candidates() if candidates is None else [dict(c) for c in candidates]
    if not candidates:
        raise DataError("head selection needs at least one candidate head")
    estimator = GaussianMixtureClassifier(random_state=random_state) if estimator is None else estimator
    splitter = (StratifiedKFold(n_folds, shuffle=True, random_state=random_state) if groups is None else
                StratifiedGroupKFold(n_folds, shuffle=True, random_state=random_state))
    folds = list(splitter.split(Z, y, groups))
    # the fewest points of each class in any training fold: what a candidate's fit can count on
    smallest = np.min([np.bincount(own[train], minlength=len(classes)) for train, _ in folds], axis=0)
    if smallest.min() < 2:
        k = int(np.argmin(smallest))
        raise DataError(f"head selection: class {classes[k].item()!r} has {int(np.sum(own == k))} training samples; "
                        f"{n_folds}-fold cross-validation leaves {int(smallest[k])} in a training fold, and a "
                        f"covariance needs 2 (more data, or fit without selection)")
    # Many small k-means fits: OpenMP threads cost more than they save there, and several times
    # more on busy cores (digits, d = 8, 2 cores: 52 s with them, 10 s without).
    with threadpool_limits(limits=1, user_api="openmp"):
        losses, skipped = _cross_validate(Z, y, own, classes, folds, smallest, candidates, estimator)
    base = {k: estimator.get_params()[k] for k in ("n_components_per_class", "covariance_type", "shrinkage")}
    full_params = [{**base, **p} for p in candidates]  # the table names all three for every row
    return compare_losses(losses, full_params, n_folds, skipped)


def _cross_validate(Z, y, own, classes, folds, smallest, candidates, estimator):
    """``losses (n, C)``, candidate ``c``'s out-of-fold losses in column ``c`` (NaN if skipped), and
    ``skipped``: candidate index -> why it was not scored."""
    losses, skipped = np.full((len(Z), len(candidates)), np.nan), {}
    for c, params in enumerate(candidates):
        m = params.get("n_components_per_class", estimator.get_params()["n_components_per_class"])
        if smallest.min() < 2 * m:
            k = int(np.argmin(smallest))
            skipped[c] = (f"class {classes[k].item()!r} has {int(smallest[k])} samples in a training fold; "
                          f"{m} components need {2 * m}")
            continue
        try:
            for train, test in folds:
                head = clone(estimator).set_params(**params).fit(Z[train], y[train])
                losses[test, c] = -head.class_log_likelihood(Z[test])[np.arange(len(test)), own[test]]
        except DataError as err:  # this structure does not fit these data; the others may
            skipped[c] = str(err).splitlines()[0]
        if c not in skipped and not np.isfinite(losses[:, c]).all():
            skipped[c] = "a held-out log-likelihood is not finite"
        if c in skipped:
            losses[:, c] = np.nan
    return losses, skipped


def compare_losses(losses, candidates, n_folds, skipped=None, confidence=CONFIDENCE) -> HeadSelection:
    """Rows, best and choice from per-point held-out losses ``losses (n, C)`` of ``candidates`` (C
    dicts), cross-validated in ``n_folds`` folds; ``skipped`` maps a candidate's index to why it was not
    scored. See :func:`select_head`."""
    losses = np.asarray(losses, dtype=np.float64)
    skipped = dict(skipped or {})
    n = len(losses)
    scored = [c for c in range(len(candidates)) if c not in skipped]
    if not scored:
        reasons = "; ".join(sorted(set(skipped.values())))
        raise DataError(f"head selection: no candidate head could be fitted on these latents ({reasons})")
    if n < 2:
        raise DataError(f"head selection needs at least 2 points, got {n}")
    ce = losses[:, scored].mean(axis=0)
    b = scored[int(np.argmin(ce))]
    quantile = stats.t.ppf((1 + confidence) / 2, n - 1)
    rows = []
    for c, params in enumerate(candidates):
        if c in skipped:
            rows.append(SelectionRow(dict(params), c, skipped=skipped[c]))
            continue
        d = losses[:, c] - losses[:, b]
        mean, half = float(d.mean()), float(quantile * d.std(ddof=1) / np.sqrt(n))
        rows.append(SelectionRow(dict(params), c, float(losses[:, c].mean()), mean, (mean - half, mean + half),
                                 best=c == b))
    order = sorted(range(len(rows)), key=lambda c: complexity(rows[c].params))  # stable: ties keep given order
    choice = next(c for c in order if rows[c].not_worse)
    rows[choice].chosen = True
    return HeadSelection([rows[c] for c in order], dict(rows[choice].params), dict(rows[b].params),
                         n_folds=n_folds, n_points=n, confidence=confidence, losses=losses)


def _check_data(Z, y, n_folds):
    """Validated ``Z`` float64, ``y``, the classes and each label's class index."""
    if not isinstance(n_folds, Integral) or isinstance(n_folds, bool) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    Z, y = np.asarray(Z, dtype=np.float64), np.asarray(y).ravel()
    if Z.ndim != 2 or len(Z) != len(y):
        raise DataError(f"head selection needs latents (n, d) and n labels, got {Z.shape} and {y.shape}")
    if not np.isfinite(Z).all():
        raise DataError("head selection: the latents contain NaN or infinite values")
    classes, own, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"head selection needs at least 2 classes, got {len(classes)}")
    if counts.min() < n_folds:
        k = int(np.argmin(counts))
        raise DataError(f"head selection: class {classes[k].item()!r} has {counts[k]} training samples; "
                        f"{n_folds}-fold cross-validation needs at least {n_folds} per class (more data, "
                        f"or fit without selection)")
    return Z, y, classes, own

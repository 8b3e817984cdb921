"""Anytime-valid sequential certification engine (BRIEF §7), pure numpy, no torch: the look
schedule, the stopping rules, the alpha-spending plan, and ``run_sequential``, which counts hits
of many inputs at once with budget triage. ``gmcert.smoothing.smoother.Smoother`` supplies the draws.

The engine asks one thing of its caller: given whatever chose each input's class c_A and prior,
the counted draws are i.i.d. Bernoulli(p_A), p_A = p_{c_A} (``gmcert.smoothing.smoother``, facts 1-2).
Then, with priors and stopping rules deciding cost only, never validity:

3. The confidence sequence (CS) covers p_A at every look simultaneously with probability
   >= 1 - alpha, so stopping at any look by any rule (including triage rules that look at other
   inputs) keeps P(p_A < p_lower) <= alpha. Two constructions, both fixed from the pilot before
   counting:
   * ``"spending"`` (default): look j gets the one-sided Clopper-Pearson bound at level
     alpha * w_j, with sum_j w_j <= 1 (union bound). The weights put alpha where the prior
     expects this input to stop (``plan_alpha_weights``), keeping a floor everywhere.
   * ``"mixture"``: the beta-binomial mixture martingale of ``stats.betabinomial_cs`` (Ville), its
     mixing prior half the pilot's Beta and half Jeffreys' (``MIXTURE_KT_WEIGHT``).
   A wrong prior moves alpha to the wrong looks or the mixture to the wrong place: it costs
   samples, never validity.
4. Radius mode with ``final_share`` f > 0 (default 0.8): the CS above runs at level (1 - f) alpha.
   Once its hit rate says fixed-n CERTIFY would not reach ``max_radius`` (even at an optimistic
   rate) and a plan is affordable, the input gets one planned final look: n2 fresh draws, n2 a
   function of the CS's draws only, and a one-sided Clopper-Pearson bound at level f alpha on
   those n2 draws alone. Given the earlier draws, the fresh ones are i.i.d. Bernoulli(p_A), so
   P(p_A < that bound) <= f alpha; with the CS's (1 - f) alpha the union is <= alpha. The final
   p_lower is the larger of the two. A look planned from the data costs a few earlier draws that
   the final bound does not use, and buys a single look at nearly the full alpha, where a CS must
   spread alpha over every look at which it might stop.
If p_lower > 1/2 then c_A is the smoothed prediction and no perturbation of L2 norm below
sigma * Phi^-1(p_lower) changes it (Cohen et al., Theorem 1).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr, ndtri

from gmcert.smoothing import stats
from gmcert.errors import DataError

#: stop_reason values; "" (index 0) marks an input still being counted.
STOP_REASONS = ("", "target_certified", "target_out_of_reach", "max_radius", "abstain",
                "radius_converged", "max_samples", "undecided", "fixed_n", "target_unreachable",
                "radius_planned")
_MAX_SAMPLES, _UNDECIDED, _PLANNED = 6, 7, 10
#: A final look is planned once it needs at most this many times the draws counted so far.
_PLAN_RATIO = 32.0
#: Range (in sigma) of the per-input radius tolerances that ``ca_tol`` sets.
_CA_TOL_RANGE = (0.015, 0.25)
#: The mixture sequence's weight on the Krichevsky-Trofimov (Jeffreys) part of its mixing prior: a
#: prior from the pilot that misses the truth costs a factor 2 of wealth, not every certificate.
MIXTURE_KT_WEIGHT = 0.5
#: Target-mode futility: predictive standard deviations of optimism (``StoppingRules``), and the
#: counted draws before it may fire.
_FUTILITY_Z, _FUTILITY_MIN = 2.0, 64


def look_schedule(first_check=32, growth=1.1, max_samples=100_000):
    """Sample sizes (J,) at which the CS is checked: steps of ``first_check``, then growing
    geometrically by ``growth``, ending exactly at ``max_samples``."""
    if not (max_samples >= 1 and first_check >= 1 and growth > 1.0):
        raise DataError("need max_samples >= 1, first_check >= 1 and growth > 1")
    looks = [min(first_check, max_samples)]
    while looks[-1] < max_samples:
        step = max(first_check, math.ceil((growth - 1.0) * looks[-1]))
        looks.append(min(max_samples, looks[-1] + step))
    return np.asarray(looks, dtype=np.float64)


class StoppingRules:
    """When an input stops counting. Rules decide cost, never validity (module docstring).

    Target mode (threshold = Phi(target / sigma) given): ``target_certified`` once
    LCB >= threshold; ``target_out_of_reach`` once UCB < threshold; ``max_samples`` once the
    draws allowed are used up; ``target_unreachable`` (futility) before that, once the run's own
    bound at its last allowed draw (``z_final``, default fixed-n CERTIFY's) would stay below the
    threshold even if the draws still to come lifted the final hit rate ``_FUTILITY_Z`` (2)
    predictive standard deviations above the estimate. That spread,
    sqrt(p (1 - p) (limit - t) / (t limit)), shrinks as the draws left run out, so an input whose
    certificate is out of this run's reach stops long before its last draw (a conditional-power
    rule, as in group-sequential trials). Radius mode: ``max_radius`` once
    LCB >= Phi(max_radius / sigma); ``abstain`` once
    UCB < 1/2; ``radius_converged`` once the radius is within ``radius_tol`` of what fixed-n
    CERTIFY with ``max_samples`` draws would give at the current hit rate (abstaining counts as
    radius 0, and then the projection at an optimistic rate must be within tolerance too), unless
    that projection reaches ``max_radius``. Both modes: ``max_samples``.
    """

    def __init__(self, alpha, sigma, max_radius=None, radius_tol=None, max_samples=100_000):
        self.alpha, self.sigma, self.max_samples = alpha, sigma, max_samples
        self.cap = np.inf if max_radius is None else float(max_radius)
        self.cap_p = ndtr(self.cap / sigma)
        self.tol = 0.03 * sigma if radius_tol is None else float(radius_tol)
        self._z_fixed_n = -ndtri(alpha)
        self._plan_sizes = np.unique(np.round(np.geomspace(16, max_samples, 400)))  # final-look sizes

    def project(self, p_hat):
        """(radius, reaches max_radius) of fixed-n CERTIFY with max_samples draws at rate p_hat."""
        n = self.max_samples
        p_lower = stats.clopper_pearson_lower(np.round(np.asarray(p_hat) * n), n, self.alpha)
        return self.sigma * ndtri(p_lower), p_lower >= self.cap_p

    def decide(self, hits, trials, lower, upper, threshold=None, projection=None, limit=None,
               z_final=None, tol=None):
        """Index into STOP_REASONS (0: go on), broadcast over all arguments; ``projection``:
        ``project(hits / trials)`` if already computed; ``limit``: counted draws allowed
        (default ``max_samples``); ``z_final``: target mode, the z-score of the run's bound at
        its last allowed draw (default: fixed-n CERTIFY's, ``-ndtri(alpha)``); ``tol``: radius
        tolerance per input (default ``radius_tol``)."""
        limit = self.max_samples if limit is None else limit
        if threshold is not None:
            p_hat = hits / trials
            left = np.maximum(limit - trials, 0.0) / limit
            predictive = _standard_error(p_hat, trials) * np.sqrt(left)
            hopeful = np.minimum(p_hat + _FUTILITY_Z * predictive, 1.0)
            z_last = self._z_fixed_n if z_final is None else np.maximum(z_final, self._z_fixed_n)
            final_lower, _ = stats.wilson_interval(hopeful, limit, z_last)
            # a run that has used all its draws ends max_samples, not futile
            # futility waits for _FUTILITY_MIN draws: checked every few draws from the start, its
            # optimism would be outrun by early noise
            conditions = [lower >= threshold, upper < threshold, trials >= limit,
                          (final_lower < threshold) & (trials >= _FUTILITY_MIN)]
            codes = [1, 2, _MAX_SAMPLES, 9]
        else:
            ref_radius, reachable = projection if projection is not None else self.project(hits / trials)
            now = np.maximum(self.sigma * ndtri(np.minimum(lower, self.cap_p)), 0.0)
            ref = np.maximum(np.minimum(ref_radius, self.cap), 0.0)
            tol = self.tol if tol is None else tol
            converged = ~reachable & (ref - now <= tol)
            conditions = [lower >= self.cap_p, upper < 0.5,
                          self._abstain_settled(converged, lower, hits, trials, tol), trials >= limit]
            codes = [3, 4, 5, _MAX_SAMPLES]
        return np.select(conditions, codes, 0)

    def plan_final(self, hits, trials, level, limit, ref_radius, tol=None):
        """Draws n2 (N,) of a planned final look at ``level``, 0 where none is planned yet;
        ``ref_radius``: ``project(hits / trials)[0]``, as ``decide`` already computed it;
        ``tol``: radius tolerance per input (default ``radius_tol``).

        Planned where the hit rate is over 1/2, fixed-n CERTIFY at rate + 2 standard errors stays
        below ``max_radius``, its radius at the current rate exceeds 2 tol, and the look, sized with
        Wilson bounds (planning only) to land within tol of that radius, needs at most
        ``_PLAN_RATIO`` times the draws so far. Capped at ``limit - trials``.
        """
        p_hat, ref, tol = hits / trials, ref_radius, self.tol if tol is None else tol
        _, reachable = self.project(_optimistic(p_hat, trials))
        goal = ndtr(np.maximum(ref - tol, 0.0) / self.sigma)  # p_lower that lands within tol
        lower, _ = stats.wilson_interval(p_hat[:, None], self._plan_sizes, -ndtri(np.asarray(level))[..., None])
        enough = lower >= goal[:, None]
        n2 = np.where(enough.any(axis=1), self._plan_sizes[np.argmax(enough, axis=1)], np.inf)
        plan = (p_hat > 0.5) & ~reachable & (ref > 2.0 * tol) & (n2 <= _PLAN_RATIO * trials)
        return np.where(plan, np.maximum(np.minimum(n2, limit - trials), 0.0), 0.0)

    def _abstain_settled(self, converged, lower, hits, trials, tol):
        """``converged`` where it ends certified; where it would end abstaining (radius 0), only
        if fixed-n CERTIFY would stay within tol even at an optimistic rate (estimate + 2 standard
        errors), so that a few early draws cannot talk an input with a real radius into abstaining."""
        converged, lower, hits, trials, tol = np.broadcast_arrays(converged, lower, hits, trials, tol)
        abstaining = converged & (lower <= 0.5)
        if not abstaining.any():
            return converged
        p_hat = hits[abstaining] / trials[abstaining]
        settled = converged.copy()
        settled[abstaining] = self.project(_optimistic(p_hat, trials[abstaining]))[0] <= tol[abstaining]
        return settled


def _standard_error(p_hat, trials):
    """sqrt(v / t) with v = p(1 - p) at least 1/t: an all-hit (or no-hit) rate is not certain."""
    t = np.maximum(trials, 1.0)
    return np.sqrt(np.maximum(p_hat * (1.0 - p_hat), 1.0 / t) / t)


def _optimistic(p_hat, trials):
    """An optimistic hit rate for planning and stopping (never for a bound): estimate + 2 SE."""
    return np.minimum(p_hat + 2.0 * np.sqrt(p_hat * (1.0 - p_hat) / trials), 1.0)


def plan_alpha_weights(mu_z, var_z, looks, rules, threshold=None, floor=0.2, spread=3.0):
    """Alpha-spending weights (N, J) summing to < 1 per input: where the prior expects a stop.

    For probit-scale prior nodes p = Phi(mu_z + sqrt(var_z) * node), the look at which the rules
    would stop if the hit rate were exactly p is found with Wilson bounds (a planning
    approximation only); those looks, smoothed by a Gaussian kernel of ``spread`` looks, get
    ``1 - floor`` of the weight and every look gets ``floor / J``.
    """
    nodes, node_w = np.polynomial.hermite_e.hermegauss(12)
    node_w = node_w / node_w.sum()
    z_plan = -ndtri(0.2 * rules.alpha)  # a typical per-look level under this plan
    offsets = np.arange(-int(3 * spread), int(3 * spread) + 1)
    kernel = np.exp(-0.5 * (offsets / spread) ** 2)
    kernel /= kernel.sum()
    n_looks, weights = len(looks), []
    for rows in np.array_split(np.arange(len(mu_z)), max(1, len(mu_z) // 256)):
        p = np.clip(ndtr(mu_z[rows, None] + np.sqrt(var_z[rows, None]) * nodes), 1e-12, 1 - 1e-12)
        lower, upper = stats.wilson_interval(p[..., None], looks, z_plan)
        projection = tuple(v[..., None] for v in rules.project(p))
        thr = None if threshold is None else threshold[rows, None, None]
        stop = rules.decide(p[..., None] * looks, looks, lower, upper, thr, projection, looks[-1]) > 0
        stop[..., -1] = True
        stop_look = np.argmax(stop, axis=2)  # (rows, nodes)
        w = np.zeros((len(rows), n_looks))
        for offset, k in zip(offsets, kernel):
            np.add.at(w, (np.repeat(np.arange(len(rows)), len(nodes)),
                          np.clip(stop_look + offset, 0, n_looks - 1).ravel()),
                      np.tile(node_w * k, len(rows)))
        weights.append((1.0 - floor) * w / w.sum(axis=1, keepdims=True) + floor / n_looks)
    weights = np.concatenate(weights)
    return weights / (weights.sum(axis=1, keepdims=True) * (1.0 + 1e-9))  # sum < 1 despite rounding


def run_sequential(count_hits, prior_z, alpha, sigma, *, sequence="spending", prior_ab=None,
                   target_radii=None, max_radius=None, radius_tol=None, max_samples=100_000,
                   counted_limit=None, budget=None, first_check=32, growth=1.1, progress=False,
                   plan_weights=None, final_share=0.8, ca_tol=None):
    """Anytime-valid sequential certification of many inputs at once (pure numpy core).

    Parameters
    ----------
    count_hits : callable ``(indices (k,), chunks (k,)) -> hits (k,)``
        Draws ``chunks[j]`` fresh noisy samples of input ``indices[j]`` and returns how many the
        base classifier assigns to that input's selected class. Draws must be independent of
        everything that chose the class and the prior.
    prior_z : (mu_z (N,), var_z (N,))
        Probit-scale prior predictive of each p_A (fixed before counting).
    alpha, sigma : float
        Error probability of each certificate; noise level.
    sequence : {"spending", "mixture"}
        CS construction (module docstring). ``prior_ab``: Beta(a, b) arrays for the mixture,
        default ``stats.beta_from_probit(*prior_z)``.
    target_radii : None, float or array_like (N,)
        Target mode if given, else radius mode (``StoppingRules``).
    max_radius, radius_tol, max_samples :
        Radius cap, convergence tolerance (default ``0.03 * sigma``), and the n of the fixed-n
        certificate the rules compare with.
    counted_limit : None, int or array_like (N,)
        Counted draws per input at most (reason ``max_samples``); default ``max_samples``.
    budget : int or None
        Total counted draws over all inputs (triage): each round, open inputs get their next
        chunk cheapest-to-decide first, each only while the budget also covers finishing every
        cheaper input; those left open when it runs out end ``undecided``.
    first_check, growth :
        Look schedule (``look_schedule``).
    final_share : float or array_like (N,), in [0, 1)
        Radius mode only: share of alpha kept for a planned final look (module docstring, fact
        4); 0 turns it off. Per input it may depend on the pilot, never on counted draws.
        Inputs that end there stop with reason ``radius_planned``.
    ca_tol : float or None
        Radius mode only: the certified-accuracy gap (a fraction of the inputs) to fixed-n
        CERTIFY to aim for at each radius; the worst radius of a batch lands higher, by the
        batch's sampling noise (about twice on 540 inputs). Each input's radius tolerance becomes
        ``ca_tol`` over the density of the batch's projected radii around its own (fraction of
        inputs per unit radius), within ``_CA_TOL_RANGE`` sigma, instead of one ``radius_tol``
        for all: tight where radii crowd, loose where they are sparse (``ca_tolerances``).
        Decides cost, never validity.
    plan_weights : callable or None
        Alpha-spending planner with the signature of ``plan_alpha_weights`` (the default). A
        hook for callers (``Smoother.certify_batch`` passes the one it sees, so tests can swap
        in invalid plans and check that the soundness tests catch them).

    Returns
    -------
    dict of arrays (N,): ``hits``, ``trials``, ``p_lower``, ``p_upper``, ``reason`` (str),
    ``radius_tol`` (the tolerance each input ended with; NaN in target mode).
    """
    mu_z, var_z = (np.asarray(v, dtype=np.float64) for v in prior_z)
    n_inputs = len(mu_z)
    rules = StoppingRules(alpha, sigma, max_radius, radius_tol, max_samples)
    threshold = None
    if target_radii is not None:
        target = np.broadcast_to(np.asarray(target_radii, dtype=np.float64), (n_inputs,))
        if np.any(~np.isfinite(target) | (target < 0)):
            raise DataError("target_radii must be finite and >= 0")
        threshold = ndtr(target / sigma)
    limit = np.broadcast_to(np.asarray(max_samples if counted_limit is None else counted_limit,
                                       dtype=np.float64), (n_inputs,))
    if np.any(limit < 1):
        raise DataError("every input needs at least one counted draw (max_samples too small)")
    looks = look_schedule(first_check, growth, int(limit.max()))
    if sequence == "spending":
        weights = (plan_alpha_weights if plan_weights is None else plan_weights)(
            mu_z, var_z, looks, rules, threshold)
    elif sequence == "mixture":
        a, b = prior_ab if prior_ab is not None else stats.beta_from_probit(mu_z, var_z)
        a, b = np.broadcast_to(a, (n_inputs,)), np.broadcast_to(b, (n_inputs,))
    else:
        raise DataError(f"sequence must be 'spending' or 'mixture', got {sequence!r}")
    z_final = None if threshold is None else _last_look_z(
        looks, limit, alpha, threshold, weights if sequence == "spending" else None,
        None if sequence == "spending" else (a, b))
    final_share = np.broadcast_to(np.asarray(final_share, dtype=np.float64), (n_inputs,))
    if np.any(~(final_share >= 0.0) | ~(final_share < 1.0)):
        raise DataError("final_share must lie in [0, 1)")
    final_share = final_share if threshold is None else np.zeros(n_inputs)
    if ca_tol is not None and (threshold is not None or not 0.0 < ca_tol < 1.0):
        raise DataError("ca_tol is for radius mode and must lie in (0, 1)")
    tol = np.full(n_inputs, rules.tol if threshold is None else np.nan)
    projected = np.full(n_inputs, np.nan)  # ca_tol: each input's latest projected radius
    cs_alpha, final_alpha = alpha * (1.0 - final_share), alpha * final_share  # fact 4
    hits, trials = np.zeros(n_inputs), np.zeros(n_inputs)
    final = np.zeros(n_inputs)  # draws of the planned final look, 0 while none is planned
    lcb, ucb = np.zeros(n_inputs), np.ones(n_inputs)
    code, look = np.zeros(n_inputs, dtype=int), np.full(n_inputs, -1)
    budget_left = np.inf if budget is None else float(budget)
    from tqdm.auto import tqdm

    with tqdm(total=n_inputs, disable=not progress, desc="certified", unit="input") as bar:
        while (open_ := np.flatnonzero(code == 0)).size:
            chunk = np.where(final[open_] > 0, final[open_],
                             np.minimum(looks[look[open_] + 1], limit[open_]) - trials[open_])
            if budget is not None:  # triage: cheapest decisions first, as far as the budget goes
                need = np.maximum(chunk, _remaining_cost(hits[open_], trials[open_], rules,
                                                         threshold, open_))
                order = np.argsort(need, kind="stable")
                # serve an input only while the budget also covers finishing every cheaper one
                keep = np.cumsum(need[order]) <= budget_left
                if not keep.any():  # nothing can be finished: spend what is left, cheapest first
                    keep = np.cumsum(chunk[order]) <= budget_left
                if not keep.any():
                    code[open_] = _UNDECIDED
                    break
                open_, chunk = open_[order][keep], chunk[order][keep]
                budget_left -= chunk.sum()
            new_hits = np.asarray(count_hits(open_, chunk.astype(np.int64)), dtype=np.float64)
            trials[open_] += chunk
            ends = final[open_] > 0
            if ends.any():  # the planned final look: its own fresh draws only, at final_alpha
                done = open_[ends]
                lo = stats.clopper_pearson_lower(new_hits[ends], chunk[ends], final_alpha[done])
                lcb[done] = np.maximum(lcb[done], lo)
                hits[done] += new_hits[ends]
                code[done] = np.where(lcb[done] >= rules.cap_p, 3, _PLANNED)
                bar.update(len(done))
                open_, new_hits = open_[~ends], new_hits[~ends]
                if not open_.size:
                    continue
            hits[open_] += new_hits
            look[open_] += 1  # the look index, not the sample size, carries the spending weight
            if sequence == "spending":
                level = cs_alpha[open_] * weights[open_, look[open_]]
                lo = stats.clopper_pearson_lower(hits[open_], trials[open_], level)
                hi = stats.clopper_pearson_upper(hits[open_], trials[open_], level)
            else:
                lo, hi = stats.betabinomial_cs(hits[open_], trials[open_], cs_alpha[open_], a[open_], b[open_],
                                               kt_weight=MIXTURE_KT_WEIGHT)
            lcb[open_] = np.maximum(lcb[open_], lo)  # running max/min: the CS covers every look
            ucb[open_] = np.minimum(ucb[open_], hi)
            # one fixed-n projection per round, for the stopping rules and the final-look plan
            projection = None if threshold is not None else rules.project(hits[open_] / trials[open_])
            if ca_tol is not None:
                projected[open_] = np.where(projection[1], np.nan, projection[0])
                tol[open_] = ca_tolerances(projected, open_, ca_tol, rules)
            code[open_] = rules.decide(hits[open_], trials[open_], lcb[open_], ucb[open_],
                                       None if threshold is None else threshold[open_],
                                       projection=projection, limit=limit[open_],
                                       z_final=None if z_final is None else z_final[open_],
                                       tol=None if threshold is not None else tol[open_])
            bar.update(int(np.count_nonzero(code[open_])))
            plan = (code[open_] == 0) & (final_share[open_] > 0)
            if plan.any():
                going = open_[plan]
                final[going] = rules.plan_final(hits[going], trials[going], final_alpha[going],
                                                limit[going], projection[0][plan], tol[going])
    return {"hits": hits, "trials": trials, "p_lower": lcb, "p_upper": ucb,
            "reason": np.asarray(STOP_REASONS, dtype=object)[code], "radius_tol": tol}


def ca_tolerances(projected, rows, ca_tol, rules, bandwidth=0.2):
    """Radius tolerances (len(rows),) that keep a certified-accuracy gap near ``ca_tol``.

    An input whose radius lands tol_i below fixed-n CERTIFY's moves the certified-accuracy curve
    at radii in (R_i - tol_i, R_i], so at radius r the curve drops by about d(r) tol(r), d the
    density of the radii (fraction of the N inputs per unit radius). Setting tol = ca_tol / d
    spreads the gap evenly over the radii. d is estimated from ``projected`` (N,), each input's
    latest projected radius (NaN where unknown, abstaining or at ``max_radius``: those move no
    radius r > 0), by a Gaussian kernel of ``bandwidth`` sigma on a fine histogram. Rows
    without a projection keep ``rules.tol``.
    """
    sigma, n_inputs = rules.sigma, len(projected)
    known = projected[np.isfinite(projected) & (projected > 0)]
    mine = projected[rows]
    lo, hi = (bound * sigma for bound in _CA_TOL_RANGE)
    if not known.size:
        return np.full(len(rows), rules.tol)
    width, h = bandwidth * sigma / 4.0, bandwidth * sigma
    edges = np.arange(0.0, known.max() + 5.0 * h, width)
    counts, _ = np.histogram(known, edges)
    offsets = np.arange(-16, 17) * width
    kernel = np.exp(-0.5 * (offsets / h) ** 2) / (h * math.sqrt(2.0 * math.pi))
    density = np.convolve(counts, kernel)[16:16 + len(counts)] / n_inputs  # centred, any length
    at = np.interp(mine, 0.5 * (edges[:-1] + edges[1:]), density, left=density[0], right=0.0)
    tol = np.clip(ca_tol / np.maximum(at, 1e-12), lo, hi)
    return np.where(np.isfinite(mine) & (mine > 0), tol, rules.tol)


def _last_look_z(looks, limit, alpha, threshold, weights=None, prior_ab=None):
    """Target mode, futility rule only: the z-score (N,) of each input's CS bound at its last
    allowed draw ``limit``: from the spending weight of that look, or, for the mixture, from its
    bound at hit rate = threshold (a planning approximation; it decides cost, never validity)."""
    if weights is not None:
        last = np.minimum(np.searchsorted(looks, limit, side="left"), len(looks) - 1)
        return -ndtri(alpha * weights[np.arange(len(limit)), last])
    lower, _ = stats.betabinomial_cs(threshold * limit, limit, alpha, *prior_ab, kt_weight=MIXTURE_KT_WEIGHT)
    return (threshold - lower) / np.sqrt(np.maximum(threshold * (1.0 - threshold), 1e-12) / limit)


def _remaining_cost(hits, trials, rules, threshold, idx):
    """Rough draws still needed to decide (triage order only): c^2 v / gap^2 - t, v = p(1-p), at
    least 1/t, taken at the most favourable of the estimate and the estimate -+ 2 standard errors.
    The optimism keeps an input that a few unlucky early draws make look costly from being starved
    of the draws that would show it is cheap."""
    p_hat = np.divide(hits, trials, out=np.full(len(hits), 0.5), where=trials > 0)
    t, half = np.maximum(trials, 1.0), 2.0 * _standard_error(p_hat, trials)
    c2 = 2.0 * np.log(1.0 / rules.alpha) + 4.0
    costs = []
    for p in (p_hat, np.clip(p_hat - half, 0.0, 1.0), np.clip(p_hat + half, 0.0, 1.0)):
        if threshold is not None:
            goal = threshold[idx]
        else:
            ref_radius, reachable = rules.project(p)
            goal = np.where(reachable, rules.cap_p,
                            ndtr(np.maximum(ref_radius - rules.tol, 0.0) / rules.sigma))
        spread = np.maximum(p * (1.0 - p), 1.0 / t)
        costs.append(c2 * spread / np.maximum((p - goal) ** 2, 1e-24))
    return np.min(costs, axis=0) - trials

"""Randomized smoothing of a torch classifier (BRIEF §6-§7): Cohen et al.'s PREDICT and CERTIFY,
the pilot and the priors that feed sequential certification, and ``Smoother``, which draws the
noise and drives the pure-numpy sequential engine of ``gmcert.smoothing.sequential`` (its public names
``look_schedule``, ``StoppingRules``, ``plan_alpha_weights``, ``run_sequential`` and
``STOP_REASONS`` are re-exported here).

The smoothed classifier is g(x) = argmax_k P(base(x + N(0, sigma^2 I)) = k). ``certify`` is Cohen
et al.'s CERTIFY: n0 selection draws pick c_A, n fresh draws count it, the one-sided
Clopper-Pearson bound p_lower at level 1 - alpha gives radius sigma * Phi^-1(p_lower).

``certify_sequential`` / ``certify_batch`` replace the fixed n by a confidence sequence (CS) for
p_A, checked at a fixed grid of sample sizes ("looks"), stopping as soon as the question is
settled. Validity rests on three facts, none of which involves the priors or the stopping rules:

1. Pilot draws (class selection and prior) come from a separate generator stream and are never
   counted, so given the pilot the counted draws are i.i.d. Bernoulli(p_{c_A}).
2. Alpha split between selection and the sequence: (0, alpha). The only probabilistic claim is
   p_{c_A} >= p_lower; by fact 1 it holds with probability >= 1 - alpha conditionally on
   whatever class the pilot picked, exactly as in Cohen's CERTIFY. A poorly chosen class only
   makes the procedure abstain, so selection needs no share of alpha.
3. The CS covers p_A at every look simultaneously with probability >= 1 - alpha, so stopping at
   any look by any rule keeps P(p_A < p_lower) <= alpha; the two constructions ("spending",
   "mixture") and why a wrong prior costs samples, never validity: ``gmcert.smoothing.sequential``.
If p_lower > 1/2 then c_A is the smoothed prediction and no perturbation of L2 norm below
sigma * Phi^-1(p_lower) changes it (Cohen et al., Theorem 1).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from scipy.special import ndtr, ndtri

from gmcert.smoothing import stats
from gmcert.errors import DataError
from gmcert.results import ABSTAIN, Certificate
# The sequential engine, re-exported so that ``from gmcert.smoothing.smoother import ...`` keeps working.
from gmcert.smoothing.sequential import STOP_REASONS, StoppingRules, look_schedule  # noqa: F401
from gmcert.smoothing.sequential import plan_alpha_weights, run_sequential


# -- priors -------------------------------------------------------------------------------------
# A prior sees only the pilot (own stream, never counted) and predicts p_A on the probit scale;
# validity cannot depend on it (module docstring, fact 3).


class PilotDraws:
    """What the pilot saw, from scores (N, m, K) of m pilot draws per input.

    Attributes: ``votes`` (N, K) argmax counts; ``classes`` (N,) selected c_A (most votes, ties
    to the larger mean score); ``margins`` (N, m) float64, score of c_A minus the best other.
    """

    def __init__(self, scores):
        scores = np.array(scores, dtype=np.float64)  # a copy: the best other score is found in place
        top = scores.argmax(axis=2)
        self.votes = (top[..., None] == np.arange(scores.shape[2])).sum(axis=1)
        mean = scores.mean(axis=1)
        tie_break = (mean - mean.min(axis=1, keepdims=True)) / (np.ptp(mean, axis=1, keepdims=True) + 1.0)
        self.classes = np.argmax(self.votes + tie_break, axis=1)  # tie_break < 1 vote
        own = np.take_along_axis(scores, self.classes[:, None, None], axis=2)[..., 0]
        np.put_along_axis(scores, self.classes[:, None, None], -np.inf, axis=2)
        self.margins = own - scores.max(axis=2)


def _subset(pilot, rows):
    """The PilotDraws of some inputs only."""
    part = PilotDraws.__new__(PilotDraws)
    part.votes, part.classes, part.margins = pilot.votes[rows], pilot.classes[rows], pilot.margins[rows]
    return part


class Prior:
    """Interface: ``predictive(pilot) -> (mu_z, var_z)``, the probit-scale prediction of p_A."""

    max_concentration = 2000.0

    def beta_params(self, pilot):
        """Beta(a, b) mixing prior for ``sequence="mixture"`` with the predictive's moments."""
        return stats.beta_from_probit(*self.predictive(pilot), self.max_concentration)


class UniformPrior(Prior):
    """Uninformative: p_A ~ Uniform(0, 1), i.e. probit N(0, 1) and Beta(1, 1)."""

    def predictive(self, pilot):
        n = len(pilot.classes)
        return np.zeros(n), np.ones(n)

    def beta_params(self, pilot):
        n = len(pilot.classes)
        return np.ones(n), np.ones(n)


def pilot_probit(pilot):
    """Probit estimate of p_A from pilot margins, z = mean / std, and its sampling variance.

    For a linear head the margin of x + noise is Gaussian, so Phi(z) estimates p_A without the
    coarseness of counting hits; for a Gaussian-mixture head the margin is close to Gaussian.
    """
    m = pilot.margins.shape[1]
    mean = pilot.margins.mean(axis=1)
    std = pilot.margins.std(axis=1, ddof=1) if m > 1 else np.zeros_like(mean)
    z = np.clip(mean / np.maximum(std, 1e-12 * np.abs(mean) + 1e-300), -8.0, 8.0)
    return z, (1.0 + z**2 / 2.0) / max(m - 1, 1)


class HeadPrior(Prior):
    """The head's own prediction (BRIEF §7): probit of the pilot margins, with its sampling
    variance plus ``misspecification`` (probit-scale variance for non-Gaussian margins)."""

    def __init__(self, misspecification=0.1):
        self.misspecification = misspecification

    def predictive(self, pilot):
        z, var = pilot_probit(pilot)
        return z, var + self.misspecification


class MetaPrior(Prior):
    """A small regressor from pilot features to Phi^-1(p_A), trained on a calibration split
    disjoint from the inputs later certified; its cross-validated residual variance is the
    prior's spread. Default regressor: ``GradientBoostingRegressor(max_depth=2)``."""

    def __init__(self, regressor=None):
        self.regressor = regressor

    @staticmethod
    def features(pilot):
        """(N, 4): probit estimate, hit rate, scale-free mean and log-std of the margins."""
        z, _ = pilot_probit(pilot)
        scale = np.abs(pilot.margins).mean(axis=1) + 1e-12
        return np.column_stack([z, (pilot.margins > 0).mean(axis=1), pilot.margins.mean(axis=1) / scale,
                                np.log(pilot.margins.std(axis=1) / scale + 1e-12)])

    def fit(self, features, z_target):
        """Fit on features (n, 4) and probit targets Phi^-1(p_A) (n,); returns self."""
        from sklearn.base import clone
        from sklearn.ensemble import GradientBoostingRegressor
        from sklearn.model_selection import cross_val_predict

        features, z_target = np.asarray(features, np.float64), np.asarray(z_target, np.float64)
        if features.ndim != 2 or len(features) != len(z_target) or len(z_target) < 10:
            raise DataError("MetaPrior.fit needs >= 10 rows: features (n, 4) and targets (n,)")
        base = self.regressor or GradientBoostingRegressor(max_depth=2, random_state=0)
        held_out = cross_val_predict(clone(base), features, z_target, cv=5)
        self.residual_var_ = float(np.mean((held_out - z_target) ** 2))
        self.regressor_ = clone(base).fit(features, z_target)
        return self

    def calibrate(self, smoother, X_cal, n_samples=2000, n_pilot=32):
        """Fit from calibration inputs: their pilot features and p_A counted from n_samples draws."""
        X_cal = smoother._as_batch(X_cal)
        pilot = smoother.pilot(X_cal, n_pilot)
        hits = smoother._count_hits(X_cal, pilot.classes, np.full(len(X_cal), n_samples))
        return self.fit(self.features(pilot), ndtri((hits + 0.5) / (n_samples + 1.0)))

    def predictive(self, pilot):
        if not hasattr(self, "regressor_"):
            raise DataError("MetaPrior is not fitted: call fit or calibrate first")
        z = self.regressor_.predict(self.features(pilot))
        return z, np.full_like(z, self.residual_var_)


# -- the smoother -------------------------------------------------------------------------------


class Smoother:
    """Randomized smoothing of a torch classifier under isotropic Gaussian noise.

    Parameters
    ----------
    base : torch.nn.Module or callable
        Maps a batch (B, ...) of inputs to scores (B, num_classes); argmax is the class.
    num_classes : int
        Number of classes K.
    sigma : float
        Noise standard deviation, in the units of the inputs (pixels in [0, 1]).
    batch_size : int
        Noisy samples per forward pass.
    device : str, torch.device or None
        Where noise is drawn and the base runs; default: the base's parameters' device, else CPU.
    seed : int
        Seeds two independent generator streams: pilot/selection draws and counted draws.
    """

    def __init__(self, base, num_classes, sigma, batch_size=1000, device=None, seed=0):
        if not (np.isfinite(sigma) and sigma > 0):
            raise DataError(f"sigma must be a positive number, got {sigma}")
        if int(num_classes) < 2:
            raise DataError(f"num_classes must be >= 2, got {num_classes}")
        self.base, self.num_classes = base, int(num_classes)
        self.sigma, self.batch_size = float(sigma), _positive_int(batch_size, "batch_size")
        tensors = list(base.parameters()) + list(base.buffers()) if hasattr(base, "parameters") else []
        floating = [t for t in tensors if t.is_floating_point()]
        self.device = torch.device(device if device is not None else
                                   floating[0].device if floating else "cpu")
        self.dtype = floating[0].dtype if floating else torch.float32
        self.reseed(seed)

    def reseed(self, seed):
        """Restart both generator streams from ``seed`` (independent streams via SeedSequence)."""
        pilot_seed, count_seed = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
        self._pilot_gen = torch.Generator(device=self.device).manual_seed(int(pilot_seed))
        self._count_gen = torch.Generator(device=self.device).manual_seed(int(count_seed))

    # -- Cohen et al. --------------------------------------------------------------------------

    def predict(self, x, n, alpha, batch_size=None):
        """Cohen's PREDICT: n draws; abstain unless the top-two binomial test has p <= alpha."""
        start, x = time.perf_counter(), self._as_batch(x, single=True)[0]
        counts = self._class_counts(x, _positive_int(n, "n"), self._count_gen, batch_size)
        top, second = np.argsort(counts, kind="stable")[::-1][:2]
        p_value = stats.binomial_test_pvalue(counts[top], counts[top] + counts[second], 0.5)
        prediction = int(top) if p_value <= _alpha(alpha) else ABSTAIN
        return Certificate(prediction, 0.0, "probabilistic", "smoothing", samples=int(n),
                           stop_reason="fixed_n", time=time.perf_counter() - start,
                           extra={"p_value": p_value})

    def certify(self, x, n0, n, alpha, batch_size=None):
        """Cohen's CERTIFY: n0 selection draws pick c_A, n fresh draws bound p_A from below."""
        start, x = time.perf_counter(), self._as_batch(x, single=True)[0]
        n0, n, alpha = _positive_int(n0, "n0"), _positive_int(n, "n"), _alpha(alpha)
        c_a = int(np.argmax(self._class_counts(x, n0, self._pilot_gen, batch_size)))
        n_a = int(self._class_counts(x, n, self._count_gen, batch_size)[c_a])
        p_lower = float(stats.clopper_pearson_lower(n_a, n, alpha))
        prediction, radius = (ABSTAIN, 0.0) if p_lower < 0.5 else (c_a, self.sigma * ndtri(p_lower))
        return Certificate(prediction, float(radius), "probabilistic", "smoothing",
                           samples=n0 + n, stop_reason="fixed_n",
                           time=time.perf_counter() - start, extra={"p_lower": p_lower, "n_a": n_a})

    def certify_serialized(self, x, n0, n, alpha, steps=None, warmup_interval=None, audit_size=None, verify=False,
                           **kwargs):
        """CERTIFY of a DEQ base by serialized smoothing (:mod:`gmcert.smoothing.srs`): audited
        (defaults: 3 steps, a cold batch every 10, audit 1000), or ``verify=True`` for a contractive
        DEQ (each warm answer proven within ``steps``, default 6, or solved cold: Cohen's exact count)."""
        from gmcert.smoothing.srs import certify_serialized, certify_verified

        if verify:
            if audit_size:
                raise DataError("verified serialized smoothing proves each warm answer: it takes no audit_size")
            return certify_verified(self, x, n0, n, alpha, 6 if steps is None else steps, warmup_interval, **kwargs)
        return certify_serialized(self, x, n0, n, alpha, 3 if steps is None else steps,
                                  10 if warmup_interval is None else warmup_interval,
                                  1000 if audit_size is None else audit_size, **kwargs)

    # -- sequential ----------------------------------------------------------------------------

    def certify_sequential(self, x, alpha=0.001, target_radius=None, max_radius=None,
                           max_samples=100_000, radius_tol=None, prior=None, n_pilot=None,
                           sequence=None, first_check=None, growth=1.1, final_share=0.8):
        """Anytime-valid certification of one input (``certify_batch`` with one row, no budget)."""
        return self.certify_batch(
            self._as_batch(x, single=True), target_radius, None, alpha, max_radius=max_radius,
            max_samples=max_samples, radius_tol=radius_tol, prior=prior, n_pilot=n_pilot,
            sequence=sequence, first_check=first_check, growth=growth, final_share=final_share)[0]

    def certify_batch(self, X, target_radii=None, budget=None, alpha=0.001, max_radius=None,
                      max_samples=100_000, radius_tol=None, prior=None, n_pilot=None,
                      sequence=None, first_check=None, growth=1.1, progress=False, final_share=0.8,
                      ca_tol=None):
        """Certify inputs X (N, ...) with confidence sequences, optionally under one budget.

        Each input first gets ``n_pilot`` pilot draws (class selection and ``prior``, default
        ``UniformPrior()``; they count in ``samples`` but never in the CS; see ``_select``).

        Defaults by mode. Target mode answers yes or no as soon as the data allow: ``sequence``
        ``"mixture"`` (Ville's inequality holds at every draw, so looking often costs nothing),
        looked at every ``first_check`` = 2 draws at first, after ``n_pilot`` = 8 pilot draws (a
        clear lead in 8 draws picks c_A; an unclear one gets the longer pilot; a wrong pick costs
        draws, never validity). Radius mode: ``"spending"`` with its planned final look, looks from
        32 draws, 32 pilot draws. A ``"spending"`` sequence always starts at 32 (each look costs it
        alpha). A "not certified" answer is not a claim: ``target_out_of_reach`` is backed by the
        upper bound, but futility (``target_unreachable``), ``max_samples`` and ``undecided`` only
        mean that this run stopped spending; the radius may still exceed the target.
        ``max_samples`` bounds every input's model evaluations, pilot included, and is the n of
        the fixed-n certificate that ``radius_tol`` refers to.
        Counting then follows ``run_sequential``: radius mode (``target_radii=None``, radii
        capped at ``max_radius``) or target mode. In radius mode ``final_share`` of alpha is kept
        for one planned final look (``gmcert.smoothing.sequential``, fact 4; 0 turns it off). ``ca_tol``
        (radius mode, instead of ``radius_tol``): the certified-accuracy gap to fixed-n CERTIFY,
        as a fraction of the batch, to aim for at every radius; each input then gets its own
        radius tolerance, tight where the batch's radii crowd and loose where they are sparse
        (``gmcert.smoothing.sequential.ca_tolerances``). With a
        ``budget`` (all model evaluations, pilots included) open inputs are served
        cheapest-to-decide first and those left open end ``undecided``; their radii are still
        valid, only smaller than they could have been.

        Returns
        -------
        list of Certificate; ``time`` is the batch's wall time shared evenly; ``extra`` holds
        ``p_lower``, ``p_upper_stopping``, ``counted``, ``prior_z`` (mean, var) and, in radius
        mode, ``radius_tol`` (the tolerance the input ended with). ``p_upper_stopping`` is the upper
        sequence the stopping rules consult: no part of alpha covers it, so it is a stopping
        statistic, not the upper end of a confidence interval.
        """
        start, X = time.perf_counter(), self._as_batch(X)
        target_mode = target_radii is not None
        sequence = sequence or ("mixture" if target_mode else "spending")
        first_check = first_check or (2 if sequence == "mixture" and target_mode else 32)
        n_pilot = n_pilot or (8 if target_mode else 32)
        alpha, n_pilot = _alpha(alpha), _positive_int(n_pilot, "n_pilot")
        if not n_pilot < max_samples:
            raise DataError(f"max_samples ({max_samples}) must exceed n_pilot ({n_pilot})")
        if ca_tol is not None and (radius_tol is not None or target_radii is not None):
            raise DataError("ca_tol sets every radius tolerance in radius mode: give it without "
                            "radius_tol and target_radii")
        classes, prior_z, prior_ab, pilot_samples = self._select(
            X, n_pilot, UniformPrior() if prior is None else prior, sequence == "mixture",
            extend=16 * n_pilot <= max_samples)
        max_samples = _positive_int(max_samples, "max_samples")
        counted_budget = None if budget is None else budget - int(pilot_samples.sum())
        if counted_budget is not None and counted_budget < 0:
            raise DataError(f"budget {budget} does not cover the pilots ({int(pilot_samples.sum())})")
        result = run_sequential(
            lambda idx, chunk: self._count_hits(X[idx], classes[idx], chunk), prior_z,
            alpha, self.sigma, sequence=sequence, prior_ab=prior_ab, target_radii=target_radii,
            max_radius=max_radius, radius_tol=radius_tol,
            max_samples=max_samples, counted_limit=max_samples - pilot_samples, budget=counted_budget,
            first_check=first_check, growth=growth, progress=progress, final_share=final_share,
            plan_weights=plan_alpha_weights,  # looked up here, so patching smoothing's name works
            ca_tol=ca_tol)
        cap = np.inf if max_radius is None else float(max_radius)
        elapsed = (time.perf_counter() - start) / len(X)
        certificates = []
        for i, p_lower in enumerate(result["p_lower"]):
            certified = p_lower > 0.5
            radius = min(self.sigma * ndtri(p_lower), cap) if certified else 0.0
            if certified and p_lower >= ndtr(cap / self.sigma):
                radius = cap  # exactly, so that "radius >= max_radius" survives rounding
            certificates.append(Certificate(
                int(classes[i]) if certified else ABSTAIN, float(radius), "probabilistic",
                "smoothing", samples=int(pilot_samples[i] + result["trials"][i]),
                stop_reason=result["reason"][i], time=elapsed,
                extra={"p_lower": float(p_lower), "p_upper_stopping": float(result["p_upper"][i]),
                       "counted": int(result["trials"][i]),
                       "prior_z": (float(prior_z[0][i]), float(prior_z[1][i])),
                       **({} if target_radii is not None
                          else {"radius_tol": float(result["radius_tol"][i])})}))
        return certificates

    def _select(self, X, n_pilot, prior, want_beta, extend=True):
        """Pilot: class selection and prior. With ``extend``, inputs whose top-two vote lead is
        under two standard errors get a second, 4x longer pilot (still uncounted) that replaces
        the first, so a short pilot rarely picks the wrong class.

        Returns classes (N,), prior_z (mu, var), Beta (a, b) or None, pilot draws per input (N,):
        every evaluation, so 5 ``n_pilot`` where the second pilot ran.
        """
        pilot = self.pilot(X, n_pilot)
        top_two = np.sort(pilot.votes, axis=1)[:, -2:]
        lead = top_two[:, 1] - top_two[:, 0]
        unclear = np.flatnonzero(extend & (lead < 2.0 * np.sqrt(top_two.sum(axis=1))))
        pilots = [(np.setdiff1d(np.arange(len(X)), unclear), pilot, n_pilot)]
        if unclear.size:
            pilots = [(pilots[0][0], _subset(pilot, pilots[0][0]), n_pilot),
                      # the first pilot's draws were evaluations too: both count in ``samples``
                      (unclear, self.pilot(X[unclear], 4 * n_pilot), 5 * n_pilot)]
        classes, mu, var = np.zeros(len(X), dtype=int), np.zeros(len(X)), np.zeros(len(X))
        a, b, drawn = np.ones(len(X)), np.ones(len(X)), np.zeros(len(X))
        for rows, draws, m in pilots:
            classes[rows], drawn[rows] = draws.classes, m
            mu[rows], var[rows] = prior.predictive(draws)
            if want_beta:
                a[rows], b[rows] = prior.beta_params(draws)
        return classes, (mu, var), ((a, b) if want_beta else None), drawn

    # -- sampling ------------------------------------------------------------------------------

    def pilot(self, X, n_pilot):
        """``PilotDraws`` of ``n_pilot`` draws per input from the pilot stream (never counted)."""
        X = self._as_batch(X)
        owner = torch.arange(len(X), device=self.device).repeat_interleave(n_pilot)
        scores = torch.cat([self._scores(X[j] + self._noise(len(j), X.shape[1:], self._pilot_gen))
                            for j in owner.split(self.batch_size)])
        return PilotDraws(scores.reshape(len(X), n_pilot, self.num_classes).double().cpu().numpy())

    def _count_hits(self, X, classes, chunks):
        """Hits of ``classes[i]`` among ``chunks[i]`` fresh draws around ``X[i]`` (counted stream)."""
        owner = torch.arange(len(X), device=self.device).repeat_interleave(
            torch.as_tensor(np.asarray(chunks, dtype=np.int64), device=self.device))
        classes = torch.as_tensor(np.asarray(classes), device=self.device)
        hits = torch.zeros(len(X), dtype=torch.long, device=self.device)
        for j in owner.split(self.batch_size):
            predicted = self._scores(X[j] + self._noise(len(j), X.shape[1:], self._count_gen)).argmax(1)
            hits += torch.bincount(j[predicted == classes[j]], minlength=len(X))
        return hits.cpu().numpy()

    def _class_counts(self, x, n, generator, batch_size=None):
        """Cohen's sample_noise: argmax counts (K,) over n draws around one input."""
        batch_size = self.batch_size if batch_size is None else _positive_int(batch_size, "batch_size")
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
        for size in [batch_size] * (n // batch_size) + [n % batch_size]:
            if size:
                predicted = self._scores(x + self._noise(size, x.shape, generator)).argmax(1)
                counts += torch.bincount(predicted, minlength=self.num_classes)
        return counts.cpu().numpy()

    def _noise(self, n, shape, generator):
        return self.sigma * torch.randn((n, *shape), generator=generator, device=self.device,
                                        dtype=self.dtype)

    @torch.no_grad()
    def _scores(self, batch):
        scores = self.base(batch)
        if scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise DataError(f"base returned shape {tuple(scores.shape)}, expected "
                            f"(batch, {self.num_classes})")
        return scores

    def _as_batch(self, X, single=False):
        """Inputs as a tensor on the device; ``single``: one input without a batch axis."""
        X = torch.as_tensor(X, device=self.device)
        X = (X[None] if single else X).to(self.dtype)
        if X.ndim < 2 or len(X) == 0:
            raise DataError(f"expected a batch of inputs (N, ...), got shape {tuple(X.shape)}")
        if not torch.isfinite(X).all():
            raise DataError("inputs contain NaN or inf")
        return X


def _alpha(alpha):
    if not 0.0 < float(alpha) < 1.0:
        raise DataError(f"alpha must lie in (0, 1), got {alpha}")
    return float(alpha)


def _positive_int(value, name):
    if int(value) != value or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value}")
    return int(value)

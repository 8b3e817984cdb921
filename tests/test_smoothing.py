"""Tests for gmcert.smoothing (the smoother and its sequential certify).

Soundness is tested on a base classifier whose smoothed radius is known exactly: h(x) = 1[x_0 > 0]
under N(0, sigma^2 I) gives p_1 = Phi(x_0 / sigma), smoothed class 1[x_0 > 0] and true radius
|x_0|. ``ThresholdSmoother`` runs the real Smoother code with the forward passes replaced by
their exact distribution (counts are Binomial(n, Phi(x_0 / sigma))), so 10,000-input runs take
seconds. A certificate is false when it certifies a wrong class, any class at the tie x_0 = 0,
or a radius above |x_0|. Each procedure must keep its false rate at or below alpha, shown by a
Clopper-Pearson upper bound on the observed rate; inputs sit near the edge (p_A just around the
thresholds, targets right at the truth) so that the rate is not trivially zero, and
deliberately invalid procedures must fail the same check (there a CP *lower* bound proves the
violation). A small torch test runs the same classifier end to end.
"""
import numpy as np
import pytest
import torch
from scipy.special import ndtr, ndtri

from gmcert.smoothing import sequential, smoother as smoothing
from gmcert.errors import DataError
from gmcert.results import ABSTAIN
from gmcert.smoothing.smoother import (HeadPrior, MetaPrior, PilotDraws, Prior, Smoother, UniformPrior,
                              look_schedule, run_sequential)
from gmcert.smoothing.stats import clopper_pearson_lower, clopper_pearson_upper

ALPHA = 0.05
N_INPUTS = 10_000
CHECK_LEVEL = 1e-3


class ThresholdSmoother(Smoother):
    """The Smoother of h(x) = 1[x_0 > 0] with exact numpy draws in place of forward passes.

    Inputs are arrays (N, 1) holding x_0. Only the sampling methods are replaced; selection,
    priors, sequences, stopping rules and certificates run the library's code.
    """

    def __init__(self, sigma=1.0, seed=0):
        self.sigma, self.num_classes, self.batch_size = sigma, 2, 10_000
        self._pilot_gen = np.random.default_rng([seed, 0])
        self._count_gen = np.random.default_rng([seed, 1])

    def _as_batch(self, X, single=False):
        X = np.asarray(X, dtype=np.float64)
        return X[None] if single else X

    def pilot(self, X, n_pilot):
        noisy = X[:, :1] + self.sigma * self._pilot_gen.standard_normal((len(X), n_pilot))
        return PilotDraws(np.stack([-noisy, noisy], axis=2))  # class 1 iff x_0 + noise > 0

    def _count_hits(self, X, classes, chunks):
        p_one = ndtr(X[:, 0] / self.sigma)
        return self._count_gen.binomial(np.asarray(chunks), np.where(classes == 1, p_one, 1.0 - p_one))

    def _class_counts(self, x, n, generator, batch_size=None):
        ones = generator.binomial(n, ndtr(x[0] / self.sigma))
        return np.array([n - ones, ones])


def false_certificates(certs, x0):
    pred = np.array([c.prediction for c in certs])
    radius = np.array([c.radius for c in certs])
    truth = (x0 > 0).astype(int)
    return int(np.sum((pred != ABSTAIN) & ((pred != truth) | (x0 == 0) | (radius > np.abs(x0)))))


def rate_bounds(failures, n=N_INPUTS):
    return (float(clopper_pearson_lower(failures, n, CHECK_LEVEL)),
            float(clopper_pearson_upper(failures, n, CHECK_LEVEL)))


def assert_rate_at_most_alpha(failures, n=N_INPUTS):
    assert rate_bounds(failures, n)[1] <= ALPHA, f"{failures}/{n} false certificates"


def assert_rate_above_alpha(failures, n=N_INPUTS):
    assert rate_bounds(failures, n)[0] > ALPHA, f"only {failures}/{n}: the check would miss this"


def edge_inputs(seed, target=None):
    """x_0 (N, 1): ties, p_A just above 1/2, a spread, near-certain inputs and, with a target,
    inputs whose true radius sits just below or at the target."""
    rng = np.random.default_rng(seed)
    parts = [np.zeros(500), rng.uniform(0.0, 0.1, 2000), rng.uniform(0.1, 2.5, 3000), rng.uniform(2.5, 4.0, 2000)]
    parts.append(rng.uniform(target - 0.15, target, 2500) if target else rng.uniform(1.8, 2.2, 2500))
    x0 = np.concatenate(parts) * rng.choice([-1.0, 1.0], N_INPUTS)
    return x0[:, None]


# -- fixed n (Cohen et al.) -----------------------------------------------------------------------


def test_cohen_certify_is_valid_and_reusing_the_selection_draws_is_not():
    x0 = edge_inputs(0)
    s = ThresholdSmoother(seed=1)
    certs = [s.certify(x, n0=50, n=200, alpha=ALPHA) for x in x0]
    assert_rate_at_most_alpha(false_certificates(certs, x0[:, 0]))

    class ReusedSelection(ThresholdSmoother):  # picks c_A on the very draws it then counts
        def _class_counts(self, x, n, generator, batch_size=None):
            if generator is self._pilot_gen:
                self._shared = super()._class_counts(x, n, self._count_gen)
            return self._shared

    bad = ReusedSelection(seed=1)
    ties = np.zeros((N_INPUTS, 1))
    certs = [bad.certify(x, n0=200, n=200, alpha=ALPHA) for x in ties]
    assert_rate_above_alpha(false_certificates(certs, ties[:, 0]))


def test_cohen_certify_exact_value_and_predict():
    s = ThresholdSmoother(seed=2)
    cert = s.certify(np.array([10.0]), n0=100, n=1000, alpha=0.001)  # p_1 = 1: every draw hits
    assert cert.prediction == 1 and cert.samples == 1100 and cert.stop_reason == "fixed_n"
    assert cert.radius == pytest.approx(ndtr_inverse(0.001 ** (1 / 1000)))
    assert cert.radius_kind == "probabilistic" and cert.path == "smoothing"
    assert s.predict(np.array([-10.0]), n=100, alpha=0.001).prediction == 0
    assert s.certify(np.array([0.0]), n0=100, n=1000, alpha=0.001).prediction == ABSTAIN
    abstained = [s.predict(np.array([0.0]), n=100, alpha=0.05).prediction == ABSTAIN for _ in range(200)]
    assert np.mean(abstained) >= 0.9  # at a tie PREDICT answers at most alpha of the time


def ndtr_inverse(p):
    from scipy.special import ndtri

    return float(ndtri(p))


# -- sequential -----------------------------------------------------------------------------------


class WrongPrior(Prior):
    """Deliberately wrong and confident: every input predicted at p_A = 0.9999 (or 0.02)."""

    def __init__(self, z):
        self.z = z

    def predictive(self, pilot):
        n = len(pilot.classes)
        return np.full(n, self.z), np.full(n, 1e-4)


@pytest.fixture(scope="module")
def meta_prior():
    s = ThresholdSmoother(seed=3)
    x_cal = np.random.default_rng(4).uniform(-3.5, 3.5, (300, 1))
    return MetaPrior().calibrate(s, x_cal, n_samples=2000)


PRIORS = ["uniform", "head", "meta", "wrong_high", "wrong_low"]


def make_prior(name, meta_prior):
    return {"uniform": UniformPrior(), "head": HeadPrior(), "meta": meta_prior,
            "wrong_high": WrongPrior(3.7), "wrong_low": WrongPrior(-2.0)}[name]


@pytest.mark.parametrize("sequence,prior_name", [("spending", p) for p in PRIORS] + [
    ("mixture", "uniform"), ("mixture", "head"), ("mixture", "wrong_high")])
def test_radius_mode_is_valid_for_every_prior(sequence, prior_name, meta_prior):
    x0 = edge_inputs(10)
    s = ThresholdSmoother(seed=11)
    certs = s.certify_batch(x0, alpha=ALPHA, max_radius=2.0, max_samples=5000, radius_tol=0.02,
                            prior=make_prior(prior_name, meta_prior), sequence=sequence)
    assert_rate_at_most_alpha(false_certificates(certs, x0[:, 0]))
    reasons = {c.stop_reason for c in certs}
    every_rule = {"max_radius", "abstain", "radius_converged", "max_samples", "radius_planned"}
    # A confident wrong mixture prior may never let the upper bound fall below 1/2 within
    # max_samples (costly, still valid); otherwise every radius-mode rule fires on these inputs.
    assert reasons == every_rule or (prior_name.startswith("wrong") and reasons < every_rule)
    capped = [c for c in certs if c.stop_reason == "max_radius"]
    assert all(c.radius == 2.0 for c in capped)
    assert max(c.samples for c in certs) <= 5000  # max_samples counts the pilot too
    pilot_draws = np.array([c.samples - c.extra["counted"] for c in certs])
    assert set(pilot_draws) == {32, 32 + 128}  # near-ties get the 4x longer pilot too: both are evaluations
    assert np.all(pilot_draws[np.abs(x0[:, 0]) > 2.0] == 32)


def test_ca_tol_is_valid():
    x0 = edge_inputs(12)
    certs = ThresholdSmoother(seed=12).certify_batch(x0, alpha=ALPHA, max_radius=2.0,
                                                     max_samples=5000, ca_tol=0.01)
    assert_rate_at_most_alpha(false_certificates(certs, x0[:, 0]))
    assert "radius_planned" in {c.stop_reason for c in certs}


def test_ca_tol_loosens_sparse_radii_and_keeps_the_curve_for_fewer_draws():
    """1500 radii crowd into [0.3, 0.5], 500 spread over [1, 1.9], 1000 sit past the cap. With
    ca_tol the sparse inputs get looser tolerances than the crowd; the certified-accuracy curve
    stays about as close to fixed-n CERTIFY's (20,000 draws) as with the crowd's tolerance for
    every input, for far fewer draws."""
    rng = np.random.default_rng(7)
    x0 = np.r_[rng.uniform(0.3, 0.5, 1500), rng.uniform(1.0, 1.9, 500), rng.uniform(2.5, 4.0, 1000)]
    n, radii = 20_000, np.linspace(0.0, 2.0, 201)
    p_lower = clopper_pearson_lower(rng.binomial(n, ndtr(x0)), n, 0.001)
    fixed_n = np.where(p_lower > 0.5, np.minimum(ndtri(np.maximum(p_lower, 0.5)), 2.0), 0.0)

    def run(**tolerance):
        certs = ThresholdSmoother(seed=3).certify_batch(x0[:, None], alpha=0.001, max_radius=2.0,
                                                        max_samples=n, **tolerance)
        radius = np.array([c.radius for c in certs])
        gap = max(np.mean(fixed_n >= r) - np.mean(radius >= r) for r in radii)
        return certs, gap, np.mean([c.samples for c in certs])

    certs, gap, samples = run(ca_tol=0.02)
    tol = np.array([c.extra["radius_tol"] for c in certs])
    crowd, sparse = np.median(tol[:1500]), np.median(tol[1500:2000])
    assert sparse > 3.0 * crowd
    _, uniform_gap, uniform_samples = run(radius_tol=crowd)
    assert gap <= uniform_gap + 0.01
    assert samples < 0.8 * uniform_samples


def test_planned_final_look_is_valid_and_cheaper():
    # Inputs whose radius sits inside (0, max_radius): where radius mode plans a final look.
    rng = np.random.default_rng(12)
    x0 = (rng.uniform(0.1, 1.6, N_INPUTS) * rng.choice([-1.0, 1.0], N_INPUTS))[:, None]
    planned = ThresholdSmoother(seed=13).certify_batch(x0, alpha=ALPHA, max_radius=2.0, max_samples=20_000,
                                                       radius_tol=0.02)
    ended = np.array([c.stop_reason == "radius_planned" for c in planned])
    assert ended.mean() > 0.5
    assert_rate_at_most_alpha(false_certificates(planned, x0[:, 0]))
    assert_rate_at_most_alpha(false_certificates([c for c, e in zip(planned, ended) if e], x0[ended, 0]),
                              int(ended.sum()))
    # The look sits at nearly the full alpha: the radius lands close to fixed-n CERTIFY's ...
    p_a = ndtr(np.abs(x0[ended, 0]))
    counted = np.array([c.extra["counted"] for c in planned])[ended]
    radius = np.array([c.radius for c in planned])[ended]
    cohen = np.array([ndtr_inverse(clopper_pearson_lower(round(p * 20_000), 20_000, ALPHA)) for p in p_a])
    assert np.mean(cohen - radius) < 0.03
    # ... for fewer draws than the confidence sequence alone spends on the same inputs.
    alone = ThresholdSmoother(seed=13).certify_batch(x0[ended], alpha=ALPHA, max_radius=2.0,
                                                     max_samples=20_000, radius_tol=0.02, final_share=0.0)
    assert np.mean(counted) < 0.9 * np.mean([c.extra["counted"] for c in alone])


@pytest.mark.parametrize("sequence,prior_name", [("spending", "uniform"), ("spending", "head"),
                                                 ("spending", "wrong_low"), ("mixture", "uniform"),
                                                 (None, "head"), (None, "wrong_low")])
def test_target_mode_is_valid_right_at_the_truth(sequence, prior_name, meta_prior):
    """None: target mode's defaults (mixture checked every 2 draws, 8 pilot draws)."""
    x0 = edge_inputs(20, target=1.0)
    s = ThresholdSmoother(seed=21)
    certs = s.certify_batch(x0, alpha=ALPHA, target_radii=1.0, max_samples=5000,
                            prior=make_prior(prior_name, meta_prior), sequence=sequence)
    assert_rate_at_most_alpha(false_certificates(certs, x0[:, 0]))
    reasons = {c.stop_reason for c in certs}
    assert {"target_certified", "target_out_of_reach", "target_unreachable"} <= reasons
    certified = np.array([c.stop_reason == "target_certified" for c in certs])
    assert all(c.radius >= 1.0 for c, ok in zip(certs, certified) if ok)
    # At the edge the false rate is not trivially zero: the check has something to see.
    assert false_certificates(certs, x0[:, 0]) > 0


def test_spending_every_look_at_full_alpha_fails_the_same_check(monkeypatch):
    """A fixed-n bound re-checked at every look (no alpha spending) must be caught."""
    monkeypatch.setattr(smoothing, "plan_alpha_weights",
                        lambda mu, var, looks, *args, **kw: np.ones((len(mu), len(looks))))
    x0 = edge_inputs(20, target=1.0)
    certs = ThresholdSmoother(seed=21).certify_batch(x0, alpha=ALPHA, target_radii=1.0, max_samples=5000,
                                                     sequence="spending")
    assert_rate_above_alpha(false_certificates(certs, x0[:, 0]))


@pytest.mark.parametrize("sequence,loss", [("spending", 0.01), ("mixture", 0.02)])
def test_target_futility_stops_hopeless_inputs_early_and_costs_few_certificates(monkeypatch, sequence, loss):
    """Inputs just past fixed-n CERTIFY's reach (x_0 in [1, 1.04] at 20,000 draws) cannot be
    certified by the sequence either; the futility rule must stop them early, and against the
    same run without it (predictive optimism so large it never fires) lose few certificates. The
    mixture (target mode's default) with a prior centred near the truth can certify a few of them
    late, so it may lose a little more to futility."""
    rng = np.random.default_rng(5)
    x0 = np.r_[rng.uniform(1.0, 1.04, 2000), rng.uniform(1.15, 1.3, 2000)][:, None]
    runs = {}
    for name, z in [("futility", sequential._FUTILITY_Z), ("off", 1e6)]:
        monkeypatch.setattr(sequential, "_FUTILITY_Z", z)
        certs = ThresholdSmoother(seed=5).certify_batch(x0, alpha=0.001, target_radii=1.0,
                                                        max_samples=20_000, sequence=sequence)
        assert_rate_at_most_alpha(false_certificates(certs, x0[:, 0]), len(certs))
        runs[name] = (np.array([c.extra["counted"] for c in certs]),
                      np.array([c.stop_reason == "target_certified" for c in certs]))
    (counted, certified), (counted_off, certified_off) = runs["futility"], runs["off"]
    assert np.mean(counted[:2000]) < 0.5 * np.mean(counted_off[:2000])
    assert certified_off.sum() - certified.sum() <= loss * len(x0)
    assert certified[2000:].mean() >= 0.99  # clearly certifiable inputs still are


def test_triage_spends_at_most_the_budget_and_stays_valid():
    x0 = edge_inputs(30, target=1.0)
    s = ThresholdSmoother(seed=31)
    budget = 200 * N_INPUTS
    certs = s.certify_batch(x0, alpha=ALPHA, target_radii=1.0, budget=budget, max_samples=5000, prior=HeadPrior())
    assert sum(c.samples for c in certs) <= budget
    assert_rate_at_most_alpha(false_certificates(certs, x0[:, 0]))
    reasons = [c.stop_reason for c in certs]
    assert 0 < reasons.count("undecided") < N_INPUTS // 2
    # Cheapest decisions first: near-certain inputs are decided, the undecided sit near the target.
    undecided = np.array([r == "undecided" for r in reasons])
    far = np.abs(np.abs(x0[:, 0]) - 1.0) > 1.5
    assert not np.any(undecided & far)
    # With the same budget spread evenly (each input capped at its share), fewer get certified.
    even = s.certify_batch(x0, alpha=ALPHA, target_radii=1.0, max_samples=200, prior=HeadPrior())
    even_certified = sum(c.stop_reason == "target_certified" for c in even)
    assert reasons.count("target_certified") > even_certified


def test_radius_mode_triage_finishes_near_certain_inputs_first():
    """Under a tight budget, inputs past the cap need a few hundred draws each. Planned final
    looks of thousands must not use up the budget before those are finished, and one unlucky
    early miss must not make such an input look costly for good."""
    x0 = np.random.default_rng(1).uniform(-1.0, 4.0, 2000)[:, None]
    budget = 3000 * len(x0)
    certs = ThresholdSmoother(seed=1).certify_batch(x0, alpha=0.001, max_radius=2.0,
                                                    max_samples=20_000, budget=budget)
    assert sum(c.samples for c in certs) <= budget
    reasons = np.array([c.stop_reason for c in certs])
    assert 0 < np.sum(reasons == "undecided")  # the budget does bind
    assert np.mean(reasons[x0[:, 0] > 2.5] == "max_radius") >= 0.97


def test_good_priors_cost_fewer_samples_than_wrong_ones(meta_prior):
    x0 = np.random.default_rng(40).uniform(2.2, 4.0, (2000, 1))  # near-certain inputs
    cost = {}
    for name in ["uniform", "head", "meta", "wrong_low"]:
        certs = ThresholdSmoother(seed=41).certify_batch(x0, alpha=0.001, max_radius=2.0,
                                                         prior=make_prior(name, meta_prior))
        assert all(c.radius == 2.0 for c in certs)
        cost[name] = np.mean([c.samples for c in certs])
    assert cost["head"] < cost["uniform"] < cost["wrong_low"]
    assert cost["meta"] < cost["uniform"]


def test_radius_mode_does_not_abstain_on_a_few_early_draws():
    # p_A = 0.6: fixed-n CERTIFY with 1e5 draws certifies radius ~0.24 sigma almost surely. With a
    # low early hit rate the projection alone says "Cohen abstains too", which must not end the run.
    rng = np.random.default_rng(7)
    n_inputs = 400
    result = run_sequential(lambda idx, chunk: rng.binomial(chunk, 0.6), (np.zeros(n_inputs), np.ones(n_inputs)),
                            0.001, 1.0, max_radius=2.0, max_samples=100_000)
    abstained = result["p_lower"] <= 0.5
    assert abstained.mean() <= 0.01, result["reason"][abstained][:5]
    # ...while an input at p_A = 0.5 (Cohen abstains) still stops well before max_samples
    result = run_sequential(lambda idx, chunk: rng.binomial(chunk, 0.5), (np.zeros(50), np.ones(50)),
                            0.001, 1.0, max_radius=2.0, max_samples=100_000)
    assert np.median(result["trials"]) < 50_000


def test_meta_prior_learns_the_probit_of_p_a(meta_prior):
    s = ThresholdSmoother(seed=5)
    x0 = np.linspace(0.2, 2.5, 50)[:, None]
    mu, var = meta_prior.predictive(s.pilot(x0, 32))
    assert np.corrcoef(mu, x0[:, 0])[0, 1] > 0.9
    assert 0 < var[0] < 1
    with pytest.raises(DataError, match="not fitted"):
        MetaPrior().predictive(s.pilot(x0, 32))


def test_look_schedule_and_bad_arguments():
    looks = look_schedule(32, 1.1, 1000)
    assert looks[0] == 32 and looks[-1] == 1000 and np.all(np.diff(looks) >= 32)
    with pytest.raises(DataError):
        look_schedule(0, 1.1, 1000)
    hits = lambda idx, chunk: chunk  # noqa: E731
    with pytest.raises(DataError, match="sequence"):
        run_sequential(hits, (np.zeros(2), np.ones(2)), 0.01, 1.0, sequence="bogus")
    with pytest.raises(DataError, match="target_radii"):
        run_sequential(hits, (np.zeros(2), np.ones(2)), 0.01, 1.0, target_radii=-1.0)
    s = ThresholdSmoother()
    with pytest.raises(DataError, match="budget"):
        s.certify_batch(np.ones((10, 1)), budget=100)
    with pytest.raises(DataError, match="alpha"):
        s.certify_batch(np.ones((10, 1)), alpha=1.5)
    for bad in [dict(ca_tol=0.01, radius_tol=0.02), dict(ca_tol=0.01, target_radii=1.0)]:
        with pytest.raises(DataError, match="ca_tol"):
            s.certify_batch(np.ones((10, 1)), **bad)
    for ca_tol in (0.0, 1.0, float("nan")):
        with pytest.raises(DataError, match="ca_tol"):
            s.certify_batch(np.ones((10, 1)), ca_tol=ca_tol)


def test_pilot_draws_select_by_votes_and_break_ties_by_score():
    scores = np.array([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]]])
    pilot = PilotDraws(scores)
    np.testing.assert_array_equal(pilot.votes, [[2, 2, 0]])
    assert pilot.classes[0] == 0  # two votes each; class 0 has the larger mean score
    np.testing.assert_allclose(pilot.margins, [[-1.0, 2.0, -3.0, 5.0]])


# -- torch, end to end ------------------------------------------------------------------------------


class Threshold(torch.nn.Module):
    def forward(self, x):
        return torch.stack([-x[:, 0], x[:, 0]], dim=1)


def test_torch_smoother_end_to_end():
    s = Smoother(Threshold(), num_classes=2, sigma=0.5, batch_size=4096, seed=7)
    X = torch.zeros(40, 3)
    X[:, 0] = torch.linspace(-1.5, 1.5, 40)
    x0 = X[:, 0].numpy().astype(np.float64)
    for cert in [s.certify(x, n0=100, n=5000, alpha=0.001) for x in X]:
        assert cert.samples == 5100
    cohen = [s.certify(x, 100, 5000, 0.001) for x in X]
    seq = s.certify_batch(X, alpha=0.001, max_radius=1.0)
    target = s.certify_batch(X, alpha=0.001, target_radii=0.5, prior=HeadPrior())
    for certs in (cohen, seq, target):
        assert false_certificates(certs, x0) == 0
    # Sequential radii are capped at max_radius, which is cheap to certify far from the boundary.
    far = np.abs(x0) > 1.3
    assert all(c.prediction == int(v > 0) for c, v in zip(seq, x0) if abs(v) > 0.3)
    assert max(c.radius for c in seq) == 1.0
    assert np.mean([c.samples for c, f in zip(seq, far) if f]) < 5100 / 4
    assert all((c.radius >= 0.5) == (abs(v) > 0.5 + 0.1) for c, v in zip(target, x0) if abs(abs(v) - 0.5) > 0.1)
    one = s.certify_sequential(X[-1], 0.001, target_radius=0.5)
    assert one.stop_reason == "target_certified" and one.prediction == 1


def test_torch_smoother_is_seeded_and_validates_input():
    runs = [Smoother(Threshold(), 2, 0.5, seed=3).certify(torch.tensor([0.3, 0.0]), 100, 2000, 0.001)
            for _ in range(2)]
    assert runs[0].radius == runs[1].radius
    s = Smoother(Threshold(), 2, 0.5, seed=3)
    s.certify(torch.tensor([0.3, 0.0]), 100, 2000, 0.001)
    s.reseed(3)
    assert s.certify(torch.tensor([0.3, 0.0]), 100, 2000, 0.001).radius == runs[0].radius
    with pytest.raises(DataError, match="NaN"):
        s.certify(torch.tensor([np.nan, 0.0]), 10, 10, 0.01)
    with pytest.raises(DataError, match="sigma"):
        Smoother(Threshold(), 2, 0.0)
    with pytest.raises(DataError, match="n0"):
        s.certify(torch.tensor([0.3, 0.0]), 0, 10, 0.01)
    with pytest.raises(DataError, match="expected"):
        Smoother(Threshold(), 3, 0.5).certify(torch.tensor([0.3, 0.0]), 10, 10, 0.01)

"""Sound statements from held-out latents: the KL lower bound stays below the truth (Student-t and
Gaussian classes, d = 64, 150 points per class, truth by Monte Carlo with the exact densities) and
has power; the Clopper-Pearson certified-accuracy bound covers the truth; diagnose prints no
negative KL."""
import numpy as np
import pytest
from scipy import special

from gmcert.latent.mixture import GaussianMixtureClassifier
from gmcert.mismatch.bounds import certified_accuracy_lower, heldout_cross_entropy, kl_lower_bounds
from gmcert.smoothing.stats import clopper_pearson_upper

D, NU, N = 64, 5, 150


def _draw(rng, m, shift, student):
    g = rng.standard_normal((m, D))
    return (g / np.sqrt(rng.chisquare(NU, m) / NU)[:, None] if student else g) + shift


def _logpdf(z, shift, student):
    z = z - shift
    if not student:
        return -0.5 * (z ** 2).sum(1) - D / 2 * np.log(2 * np.pi)
    return (special.gammaln((NU + D) / 2) - special.gammaln(NU / 2) - D / 2 * np.log(NU * np.pi)
            - (NU + D) / 2 * np.log1p((z ** 2).sum(1) / NU))


def _repetition(rng, student):
    """One fit on 150 points per class, the truth KL(P_0 || N_0) of that fit, and the bounds from
    150 fresh held-out points per class."""
    y = np.repeat([0, 1], N)
    head = GaussianMixtureClassifier(shrinkage="ledoit_wolf").fit(
        np.vstack([_draw(rng, N, 0.0, student), _draw(rng, N, 4.0, student)]), y)
    z = _draw(rng, 5_000, 0.0, student)
    truth = float(np.mean(_logpdf(z, 0.0, student) - head.class_log_likelihood(z)[:, 0]))
    held = np.vstack([_draw(rng, N, 0.0, student), _draw(rng, N, 4.0, student)])
    found = kl_lower_bounds(head, held, y, alpha=0.05, n_model=8_000, random_state=int(rng.integers(2 ** 31)))
    return truth, found["per_class"][0]


@pytest.mark.parametrize("student", [True, False], ids=["student-t5", "gaussian"])
def test_kl_lower_bound_is_below_the_truth_and_has_power(student):
    rng = np.random.default_rng(7 if student else 8)
    runs = np.array([_repetition(rng, student) for _ in range(200)])
    truth, lower = runs[:, 0], runs[:, 1]
    assert np.all(lower >= 0)
    misses = int(np.sum(lower > truth))
    # at most 5% of bounds above the truth (Clopper-Pearson upper at 99% on the miss rate)
    assert clopper_pearson_upper(misses, len(runs), 0.01) <= 0.05 or misses / len(runs) <= 0.05, misses
    if student:
        assert np.mean(lower > 0) >= 0.8, np.mean(lower > 0)  # power: measured 1.0 (truth about 9 nats)
        assert np.median(lower) > 0.3
    else:  # a Gaussian class: the truth is only the fit's estimation error, and the bound stays near 0
        assert np.mean(lower == 0) >= 0.95 or misses <= 10


def test_clopper_pearson_certified_accuracy_covers_the_truth():
    """Data drawn from a fixed mixture, so the true certified accuracy at r is known (a million
    draws); the held-out lower bound from 300 points stays below it in >= 95% of 400 repetitions."""
    rng = np.random.default_rng(3)
    means = np.array([[0.0, 0.0], [2.0, 0.5], [0.5, 2.2]])
    Z0 = np.vstack([rng.standard_normal((400, 2)) + m for m in means])
    head = GaussianMixtureClassifier().fit(Z0, np.repeat([0, 1, 2], 400))
    radii = np.array([0.0, 0.3, 0.6, 1.0])

    def sample(m):
        y = rng.integers(0, 3, m)
        return rng.standard_normal((m, 2)) * np.array([1.0, 1.3])[None] + means[y], y

    def scores(Z, y):
        pred, radius = head.certify(Z, method="exact")
        return pred == y, radius

    Zt, yt = sample(1_000_000)
    truth = certified_accuracy_lower(*scores(Zt, yt), radii, 0.05)[0]
    covered = np.zeros(len(radii))
    for _ in range(400):
        Z, y = sample(300)
        covered += certified_accuracy_lower(*scores(Z, y), radii, 0.05)[1] <= truth
    assert np.all(covered / 400 >= 0.95), covered / 400
    assert np.all(covered / 400 < 1.0) or truth[-1] < 0.05  # not padded: it does miss sometimes


def test_heldout_cross_entropy_ranks_heads_by_kl():
    """Differences of held-out cross-entropy estimate differences of KL: a fit on more data has
    the smaller KL, and the smaller cross-entropy."""
    rng = np.random.default_rng(0)
    y_big, y_small = np.repeat([0, 1], 2000), np.repeat([0, 1], 80)
    draw = lambda m: np.vstack([rng.standard_normal((m, 8)), rng.standard_normal((m, 8)) + 3])
    big = GaussianMixtureClassifier().fit(draw(2000), y_big)
    small = GaussianMixtureClassifier().fit(draw(80), y_small)
    held, y = draw(3000), np.repeat([0, 1], 3000)
    assert heldout_cross_entropy(big, held, y)["joint"] < heldout_cross_entropy(small, held, y)["joint"]


def test_diagnose_prints_the_sound_statement_first_and_no_negative_kl(tmp_path, capsys):
    import json

    from gmcert.cli import main

    model = tmp_path / "raw"
    assert main(["fit", "--encoder", "identity", "--dim", "16", "--out", str(model), "--cache-dir", ""]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--model", str(model), "--bootstrap", "30", "--q-samples", "2000",
                 "--cache-dir", ""]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("Held-out certified accuracy")
    table = out[out.index("KL(P_k || N_k)"):out.index("Model-based")]
    numbers = [float(v) for v in __import__("re").findall(r"(?<![\w.])-?\d+\.?\d*(?:e-?\d+)?", table.split("cross")[0])]
    assert numbers and min(numbers) >= 0
    rows = [line.split() for line in table.splitlines()[2:] if line.strip() and line.split()[0].isdigit()]
    lower = [float(r[2]) for r in rows]
    assert lower == sorted(lower, reverse=True)  # ranked by the lower bound
    assert all(float(r[3]) >= float(r[2]) >= 0 for r in rows)  # the point estimate is never below the bound
    record = json.loads((model / "mismatch.json").read_text())
    held = record["heldout"]
    assert held["n"] == 450 and len(held["kl_lower_per_class"]) == 10
    assert all(lo <= acc for lo, acc in zip(held["input_certified_accuracy_lower"], held["input_certified_accuracy"]))
    assert (model / "mismatch.png").stat().st_size > 10_000

"""Head selection by held-out likelihood (gmcert.latent.selection, `gmcert fit --select`): it finds
the structure the data were drawn from, prefers the simpler of two heads that tie, and its paired
intervals are what they claim."""
import json

import numpy as np
import pytest
from scipy import stats

from gmcert.cli import main
from gmcert.latent.selection import compare_losses, complexity, default_candidates, select_head


def _one_gaussian_per_class(rng, n, d, scale, cov=None):
    """``n`` points per class, class k centred at 4 e_k; covariance ``cov`` (shared) or ``scale[k]^2 I``."""
    y = np.repeat(np.arange(len(scale)), n)
    noise = rng.normal(size=(len(y), d))
    noise = noise @ np.linalg.cholesky(cov).T if cov is not None else noise * np.asarray(scale)[y][:, None]
    return noise + 4.0 * np.eye(len(scale), d)[y], y


def _check_rule(sel):
    """Rows run simplest first, and the chosen one is the first not significantly worse than the best."""
    keys = [complexity(row.params) for row in sel.rows]
    assert keys == sorted(keys)
    scored = [row for row in sel.rows if not row.skipped]
    assert [row.chosen for row in scored].count(True) == 1
    assert next(row for row in scored if row.interval[0] <= 0).chosen
    best = next(row for row in scored if row.best)
    assert best.difference == 0 and min(row.cross_entropy for row in scored) == best.cross_entropy


def test_picks_two_components_when_each_class_is_two_clusters():
    rng = np.random.default_rng(1)
    d, Z, y = 4, [], []
    for k in range(2):
        for side in (-1, 1):  # two unit-variance clusters per class, 10 apart
            Z.append(rng.normal(size=(120, d)) + 5.0 * np.eye(d)[k] + 5.0 * side * np.eye(d)[k + 2])
            y += [k] * 120
    sel = select_head(np.vstack(Z), np.array(y))
    _check_rule(sel)
    assert sel.chosen["n_components_per_class"] == 2
    assert all(row.interval[0] > 0 for row in sel.rows if row.params["n_components_per_class"] == 1)


def test_picks_tied_when_classes_share_one_correlated_covariance():
    rng = np.random.default_rng(2)
    d = 5
    A = rng.normal(size=(d, d))
    cov = A @ A.T + 0.3 * np.eye(d)
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 1  # far from diagonal
    Z, y = _one_gaussian_per_class(rng, 150, d, [1, 1, 1], cov=cov)
    sel = select_head(Z, y)
    _check_rule(sel)
    assert sel.chosen["covariance_type"] == "tied" and sel.chosen["n_components_per_class"] == 1


def test_one_spherical_gaussian_per_class_gets_a_simpler_head_than_full():
    rng = np.random.default_rng(3)
    Z, y = _one_gaussian_per_class(rng, 150, 5, [1.0, 2.0, 0.5])
    sel = select_head(Z, y)
    _check_rule(sel)
    assert sel.chosen["covariance_type"] in ("spherical", "diag") and sel.chosen["n_components_per_class"] == 1


def test_the_simpler_of_two_tied_heads_wins_and_a_clear_winner_stays():
    rng = np.random.default_rng(4)
    base, noise = rng.normal(size=400), rng.normal(size=400)
    heads = [{"covariance_type": "full", "shrinkage": None, "n_components_per_class": 1},
             {"covariance_type": "spherical", "shrinkage": None, "n_components_per_class": 1}]
    for scale, expected in ((1.0, "spherical"), (1e-3, "full")):
        # full is better by 0.01 nats per point: within noise at scale 1, far outside it at 1e-3
        losses = np.stack([base - 0.01 + scale * (noise - noise.mean()), base], axis=1)
        sel = compare_losses(losses, heads, n_folds=5)
        assert sel.best == heads[0] and sel.chosen["covariance_type"] == expected
        _check_rule(sel)


def test_complexity_order_and_equal_heads():
    order = [(c["n_components_per_class"], c["covariance_type"], c["shrinkage"])
             for c in sorted(default_candidates(), key=complexity)]
    assert order[:8] == [(1, t, s) for t in ("spherical", "diag", "tied", "full") for s in ("ledoit_wolf", None)]
    assert [m for m, _, _ in order] == [1] * 8 + [2] * 8 + [3] * 8
    # heads that score alike, listed most complex first: the simplest is chosen
    heads = default_candidates()[::-1]
    sel = compare_losses(np.tile(np.random.default_rng(0).normal(size=(50, 1)), len(heads)), heads, n_folds=5)
    assert sel.chosen == {"covariance_type": "spherical", "shrinkage": "ledoit_wolf", "n_components_per_class": 1}


def test_paired_intervals():
    rng = np.random.default_rng(5)
    Z, y = _one_gaussian_per_class(rng, 80, 4, [1.0, 1.5])
    tied = {"covariance_type": "tied", "shrinkage": "ledoit_wolf", "n_components_per_class": 1}
    heads = [tied, dict(tied), {"covariance_type": "full", "shrinkage": None, "n_components_per_class": 2}]
    sel = select_head(Z, y, candidates=heads, n_folds=4, random_state=7)
    rows = {row.candidate: row for row in sel.rows}
    assert np.array_equal(sel.losses[:, 0], sel.losses[:, 1])  # same head, same folds: same losses
    best = rows[0]  # tied beats two full components on one Gaussian per class; of equals, the first is best
    assert best.best and best.chosen and not rows[1].chosen
    assert rows[1].difference == 0 and rows[1].interval == (0, 0)  # a head against itself: no difference
    for c, row in rows.items():
        assert row.cross_entropy == pytest.approx(sel.losses[:, c].mean(), abs=1e-12)
        assert row.difference == pytest.approx(row.cross_entropy - best.cross_entropy, abs=1e-12)
    d = sel.losses[:, 2] - sel.losses[:, 0]
    assert rows[2].difference > 0 and d.std() > 0
    assert rows[2].interval == pytest.approx(stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d)),
                                             rel=1e-9)
    record = json.loads(json.dumps(sel.to_dict()))
    assert record["chosen"] == sel.chosen and len(record["rows"]) == 3 and record["n_points"] == len(y)


def test_heads_a_class_cannot_support_are_skipped_and_said_so():
    rng = np.random.default_rng(6)
    Z, y = _one_gaussian_per_class(rng, 60, 3, [1.0, 1.0])
    Z, y = np.vstack([Z, rng.normal(size=(7, 3)) - 4]), np.concatenate([y, [2] * 7])  # 7 points: 5 or 6 per fold
    sel = select_head(Z, y, candidates=[c for c in default_candidates() if c["covariance_type"] == "diag"])
    by_size = [row for row in sel.rows if row.params["n_components_per_class"] == 3]
    assert all(row.skipped == "class 2 has 5 samples in a training fold; 3 components need 6" for row in by_size)
    assert "skipped: class 2 has 5" in sel.table()
    assert sel.chosen["n_components_per_class"] == 1  # an EM fit may fail on 5 points too; one component serves
    with pytest.raises(ValueError, match="5-fold cross-validation needs at least 5 per class"):
        select_head(Z[:-3], y[:-3])


def test_cli_fit_select_records_and_fits_the_chosen_head(tmp_path, capsys):
    from gmcert.pipeline import Pipeline

    out = tmp_path / "model"
    assert main(["fit", "--encoder", "identity", "--dim", "8", "--select", "--out", str(out), "--cache-dir", ""]) == 0
    printed = capsys.readouterr().out
    assert "held-out cross-entropy" in printed and "\nchosen: " in printed and "best" in printed
    meta = json.loads((out / "pipeline.json").read_text())
    selection = meta["head_selection"]
    assert len(selection["rows"]) == len(default_candidates())
    # selected on the training split only: the held-out inputs never took part
    assert selection["n_points"] == 1797 - len(meta["test_index"])
    head = Pipeline.load(out).head
    assert {k: head.get_params()[k] for k in selection["chosen"]} == selection["chosen"]
    chosen_rows = [row for row in selection["rows"] if row["chosen"]]
    assert len(chosen_rows) == 1 and chosen_rows[0]["params"] == selection["chosen"]


def test_cli_select_with_a_class_too_small_for_the_folds_fails_cleanly(tmp_path, capsys):
    rng = np.random.default_rng(8)
    Z, y = _one_gaussian_per_class(rng, 50, 4, [1.0, 1.0])
    Z, y = np.vstack([Z, rng.normal(size=(4, 4))]), np.concatenate([y, [2] * 4])  # 4 < 5 folds
    np.savez(tmp_path / "z.npz", z=Z, y=y)
    code = main(["fit", "--latents", str(tmp_path / "z.npz"), "--test-size", "0", "--select",
                 "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("gmcert fit: error: ") and "class 2 has 4" in err[-1]
    assert not (tmp_path / "m").exists()

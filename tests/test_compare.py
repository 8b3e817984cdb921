"""`gmcert compare` and hybrid routing on a cheap raw-pixel model, as a user runs them."""
import csv
import json

import numpy as np
import pytest

from gmcert.cli import main
from gmcert.report import COHEN_COLUMNS, certified_accuracy, read_tsv


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "raw"
    assert main(["fit", "--encoder", "identity", "--dim", "16", "--out", str(out), "--limit", "600",
                 "--cache-dir", ""]) == 0
    return out


def _compare(model, out, *extra):
    return main(["compare", "--model", str(model), "--out", str(out), "--n-inputs", "6",
                 "--methods", "gm-exact,gm-closed,cohen,sequential", "--cohen-n", "200",
                 "--max-samples", "300", "--n0", "20", "--cache-dir", "", *extra])


def test_compare_writes_every_report(model, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(model, out) == 0
    printed = capsys.readouterr().out
    for name in ("gm-exact", "gm-closed", "cohen-n200", "sequential"):
        rows = read_tsv(out / f"{name}.tsv")
        assert len(rows) == 6 and name in printed
        with open(out / f"{name}.tsv") as handle:
            header = next(csv.reader(handle, delimiter="\t"))
        assert tuple(header[:6]) == COHEN_COLUMNS and {"samples", "radius_kind", "path"} <= set(header)
        summary = json.loads((out / f"{name}.json").read_text())
        # The summary's figures are Cohen's analysis of the TSV itself.
        np.testing.assert_allclose(summary["certified_accuracy"], certified_accuracy(rows, summary["radii"]))
    assert {r["samples"] for r in read_tsv(out / "cohen-n200.tsv")} == {220}
    assert max(r["samples"] for r in read_tsv(out / "sequential.tsv")) <= 300
    record = json.loads((out / "summary.json").read_text())
    assert record["config"]["seed"] == 0 and record["versions"]["numpy"] == np.__version__
    assert (out / "certified_accuracy.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000
    assert "| gm-exact |" in (out / "summary.md").read_text()


def test_resume_after_kill_gives_same_files(model, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert _compare(model, whole) == 0
    cut = tmp_path / "cut"
    import gmcert.compare as compare

    original, calls = compare._run_method, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # mid-run, inside the third method
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(compare, "_run_method", dying)
    assert _compare(model, cut) == 130
    monkeypatch.setattr(compare, "_run_method", original)
    assert _compare(model, cut) == 0
    for name in ("gm-exact", "gm-closed", "cohen-n200", "sequential"):
        a, b = read_tsv(whole / f"{name}.tsv"), read_tsv(cut / f"{name}.tsv")
        assert [(r["idx"], r["predict"], r["radius"], r["samples"]) for r in a] == \
               [(r["idx"], r["predict"], r["radius"], r["samples"]) for r in b]


@pytest.mark.parametrize("args, message", [
    (["--methods", "gm-exact,bogus"], "unknown method"),
    (["--radii", "0,-1"], "radii"),
    (["--sigma", "-0.5"], "sigma"),
    (["--radius-tol", "0"], "radius_tol"),
])
def test_compare_rejects_bad_arguments(model, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if message == "radii" else _no_raise():
        code = _compare(model, tmp_path / "x", *args)
        assert code == 2
    assert message in capsys.readouterr().err


def test_resume_refuses_other_settings(model, tmp_path, capsys):
    out = tmp_path / "run"
    assert _compare(model, out, "--methods", "sequential", "--n-inputs", "2") == 0
    first = (out / "sequential.tsv").read_bytes()
    assert _compare(model, out, "--methods", "sequential", "--n-inputs", "2", "--radius-tol", "0.1") == 2
    assert "radius_tol" in capsys.readouterr().err
    assert (out / "sequential.tsv").read_bytes() == first  # nothing appended


def test_radius_tol_reaches_the_smoother(model, tmp_path, monkeypatch):
    from gmcert.smoothing.smoother import Smoother

    seen, original = [], Smoother.certify_sequential

    def spy(self, x, **kwargs):
        seen.append(kwargs["radius_tol"])
        return original(self, x, **kwargs)

    monkeypatch.setattr(Smoother, "certify_sequential", spy)
    assert _compare(model, tmp_path / "t", "--methods", "sequential", "--n-inputs", "2",
                    "--radius-tol", "0.05", "--sigma", "0.5") == 0
    assert seen == [pytest.approx(0.025)] * 2


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("force", ["closed_form", "smoothing", "auto"])
def test_routing_totals_agree(model, tmp_path, force):
    from gmcert.hybrid import FallbackPolicy, certify_hybrid
    from gmcert.pipeline import Pipeline
    from gmcert.report import CertifyWriter, certificate_row, summarize

    pipeline = Pipeline.load(model)
    from gmcert.data import load_dataset

    data = load_dataset("digits", channels=None)
    X, y = data.images.numpy()[1000:1012], data.labels[1000:1012]
    policy = FallbackPolicy(target_radius=0.6, sigma=0.25, alpha=0.01, max_samples=400, force=force)
    certs = certify_hybrid(pipeline, X, policy)
    paths = [c.path for c in certs]
    if force != "auto":
        assert set(paths) == {force}
    else:
        # Exactly the inputs whose closed-form radius misses the target go to the smoother.
        closed = pipeline.certify(X)
        assert paths == ["smoothing" if c.radius <= 0.6 else "closed_form" for c in closed]
    # h's closed-form radius is f's less the routing threshold: a bound, unless h = f
    kinds = {"closed_form": {"exact" if force == "closed_form" else "bound"}, "smoothing": {"probabilistic"}}
    assert all(c.radius_kind in kinds[c.path] for c in certs)
    with CertifyWriter(tmp_path / "r.tsv") as writer:
        for i, (label, cert) in enumerate(zip(y, certs)):
            writer.write(certificate_row(i, label, cert))
    rows = read_tsv(tmp_path / "r.tsv")
    summary = summarize(rows, [0.0, 0.5])
    assert summary["rows_by_path"] == {p: paths.count(p) for p in set(paths)}
    assert sum(summary["rows_by_path"].values()) == len(rows) == len(X)


def test_certify_fallback_command(model, tmp_path, capsys):
    out = tmp_path / "hybrid.tsv"
    assert main(["certify", "--model", str(model), "--out", str(out), "--limit", "8", "--fallback", "smoothing",
                 "--target-radius", "0.6", "--max-samples", "300", "--alpha", "0.01", "--cache-dir", ""]) == 0
    rows = read_tsv(out)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) == 8 and sum(summary["rows_by_path"].values()) == 8
    assert all(r["path"] in ("closed_form", "smoothing", "band") for r in rows)
    # closed-form rows of h keep f's radius less the threshold (0.6 by default: the target)
    assert all(r["radius"] == pytest.approx(r["latent_radius"] - 0.6) for r in rows if r["path"] == "closed_form")


def test_mismatch_threshold_routes_suspect_classes_to_smoothing(model):
    from gmcert.data import load_dataset
    from gmcert.hybrid import FallbackPolicy, certify_hybrid
    from gmcert.pipeline import Pipeline

    pipeline = Pipeline.load(model)
    data = load_dataset("digits", channels=None)
    X = data.images.numpy()[1000:1016]
    closed = pipeline.certify(X)
    suspect = closed[0].prediction
    kl = {int(c): (0.9 if c == suspect else 0.01) for c in pipeline.head.classes_}
    policy = FallbackPolicy(target_radius=0.0, mismatch_threshold=0.5, kl_per_class=kl, sigma=0.25,
                            alpha=0.01, max_samples=300)
    certs = certify_hybrid(pipeline, X, policy)
    # tau = 0 for the trusted classes: a zero radius cannot tell which side of 0 rho lies (band)
    expected = ["smoothing" if c.prediction == suspect else "band" if c.radius <= 0 else "closed_form"
                for c in closed]
    assert [c.path for c in certs] == expected and "closed_form" in expected and "smoothing" in expected
    with pytest.raises(ValueError, match="diagnose"):
        FallbackPolicy(mismatch_threshold=0.5)

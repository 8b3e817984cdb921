"""The commands as a user runs them: fit and certify on user-made npz files, bad input, model files."""
import json

import numpy as np
import pytest

from gmcert.cli import main
from gmcert.report import COHEN_COLUMNS, read_tsv


def _latents(path, n=300, d=6, seed=0, shift=3.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, d)) + shift * np.eye(3, d)[y]
    np.savez(path, z=z, y=y)
    return z, y


def test_fit_and_certify_on_user_latents(tmp_path, capsys):
    _latents(tmp_path / "train.npz")
    _latents(tmp_path / "test.npz", n=100, seed=1)
    assert main(["fit", "--latents", str(tmp_path / "train.npz"), "--out", str(tmp_path / "model")]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    out = tmp_path / "results.tsv"
    assert main(["certify", "--model", str(tmp_path / "model"), "--latents", str(tmp_path / "test.npz"),
                 "--out", str(out)]) == 0
    rows = read_tsv(out)
    assert out.read_text().split("\n")[0].split("\t")[:6] == list(COHEN_COLUMNS)
    assert [r["idx"] for r in rows] == list(range(100))
    assert {r["radius_kind"] for r in rows} == {"exact"}  # latents are the inputs: radius is exact
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["clean_accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert summary["clean_accuracy"] > 0.85
    assert summary["certified_accuracy"][0] == pytest.approx(summary["clean_accuracy"])
    assert all(a >= b for a, b in zip(summary["certified_accuracy"], summary["certified_accuracy"][1:]))
    assert summary["average_certified_radius"] > 0.3


@pytest.mark.parametrize("corruption, message", [
    ("nan", "NaN"), ("shape", "shape"), ("keys", "missing"), ("notnpz", "not a readable npz"),
])
def test_bad_latents_fail_cleanly(tmp_path, capsys, corruption, message):
    path = tmp_path / "bad.npz"
    z, y = _latents(tmp_path / "ok.npz")
    if corruption == "nan":
        z[3, 1] = np.nan
        np.savez(path, z=z, y=y)
    elif corruption == "shape":
        np.savez(path, z=z[:, :, None], y=y)
    elif corruption == "keys":
        np.savez(path, x=z, y=y)
    else:
        path.write_bytes(b"not an npz at all")
    assert main(["fit", "--latents", str(path), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message.lower() in err.lower()
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_class_too_small_fails_cleanly(tmp_path, capsys):
    z, y = _latents(tmp_path / "ok.npz")
    y[:] = np.where(y == 2, 1, y)
    y[0] = 2  # a class with a single sample
    np.savez(tmp_path / "small.npz", z=z, y=y)
    assert main(["fit", "--latents", str(tmp_path / "small.npz"), "--test-size", "0",
                 "--out", str(tmp_path / "m")]) == 2
    assert "2" in capsys.readouterr().err


def test_certify_rejects_bad_model_dirs(tmp_path, capsys):
    _latents(tmp_path / "t.npz")
    missing = main(["certify", "--model", str(tmp_path / "nope"), "--latents", str(tmp_path / "t.npz")])
    assert missing == 2 and "missing" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "pipeline.json").write_text(json.dumps({"format": "something-else"}))
    assert main(["certify", "--model", str(tmp_path / "foreign"), "--latents", str(tmp_path / "t.npz")]) == 2
    assert "foreign" in capsys.readouterr().err
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "pipeline.json").write_text(json.dumps({"format": "gmcert-pipeline",
                                                                   "format_version": 99}))
    assert main(["certify", "--model", str(tmp_path / "newer"), "--latents", str(tmp_path / "t.npz")]) == 2
    assert "newer version" in capsys.readouterr().err


def test_certify_rejects_wrong_latent_dimension(tmp_path, capsys):
    _latents(tmp_path / "train.npz")
    _latents(tmp_path / "wide.npz", d=9)
    assert main(["fit", "--latents", str(tmp_path / "train.npz"), "--out", str(tmp_path / "model")]) == 0
    code = main(["certify", "--model", str(tmp_path / "model"), "--latents", str(tmp_path / "wide.npz"),
                 "--out", str(tmp_path / "r.tsv")])
    assert code == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "r.tsv").exists()

"""Bad input to every command: one line on stderr naming the problem, exit code 2, nothing written.

Each row of ``CASES`` is an argv template and a substring the error line must contain. ``{name}``
in a template is a path: ``{tmp}`` the test's own folder, ``{lat}``/``{raw}`` two small models
(fitted on synthetic latents and, with ``--encoder identity``, on raw digits pixels), any other
name a bad file or folder that ``MAKERS[name]`` creates before the run.
"""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from gmcert.cli import main


def _latents(path, n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, d)) + 3.0 * np.eye(3, d)[y]
    np.savez(path, z=z, y=y)
    return z, y


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _latents(root / "train.npz")
    quiet = ["--cache-dir", "", "--radii", "0,1"]
    assert main(["fit", "--latents", str(root / "train.npz"), "--out", str(root / "lat"), *quiet]) == 0
    assert main(["fit", "--encoder", "identity", "--dim", "8", "--limit", "300", "--out", str(root / "raw"),
                 *quiet]) == 0
    return root


# -- bad files -------------------------------------------------------------------------------
def _file(path, content=b""):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _folder(path, files=()):
    path.mkdir()
    for name, content in dict(files).items():
        _file(path / name, content)
    return path


def _edit(tmp, name, **arrays):
    """The 60 good latents of ``good``, with some arrays replaced (None: left out)."""
    z, y = _latents(tmp / name, n=60, seed=1)
    arrays = {"z": z, "y": y, **arrays}
    np.savez(tmp / name, **{k: v for k, v in arrays.items() if v is not None})
    return tmp / name


def _z_with(tmp, index, value):
    z = _latents(tmp / "scratch.npz", n=60, seed=1)[0]
    (tmp / "scratch.npz").unlink()
    z[index] = value
    return z


def _nan_held_out(tmp):
    """NaN in a row that ``fit`` holds out (default --test-size and --seed), not in one it fits on."""
    from sklearn.model_selection import train_test_split

    z, y = _latents(tmp / "nan_held_out.npz", n=60, seed=1)
    z[train_test_split(np.arange(60), test_size=0.25, random_state=0, stratify=y)[1][0], 2] = np.nan
    np.savez(tmp / "nan_held_out.npz", z=z, y=y)
    return tmp / "nan_held_out.npz"


def _singleton(tmp):
    z, y = _latents(tmp / "singleton.npz", n=300)
    y = np.where(y == 2, 1, y)
    y[0] = 2  # a class with a single sample
    np.savez(tmp / "singleton.npz", z=z, y=y)
    return tmp / "singleton.npz"


def _images(tmp, name, x, y):
    np.savez(tmp / name, x=x, y=y)
    return tmp / name


def _model_copy(tmp, models, name, edit):
    path = tmp / name
    shutil.copytree(models / "lat", path)
    edit(path)
    return path


def _retarget(path):
    """The model's recorded latents file has since shrunk below its held-out indices."""
    _latents(path.parent / "shrunk.npz", n=20)
    meta = json.loads((path / "pipeline.json").read_text())
    meta["latents"] = str(path.parent / "shrunk.npz")
    (path / "pipeline.json").write_text(json.dumps(meta))


def _nan_images(tmp):
    x = np.full((20, 8, 8), 0.5)
    x[2, 3, 3] = np.nan
    return _images(tmp, "nan_images.npz", x, np.arange(20) % 10)


MAKERS = {
    "good": lambda t, m: _edit(t, "good.npz"),
    "nan": lambda t, m: _edit(t, "nan.npz", z=_z_with(t, (3, 1), np.nan)),
    "nan_held_out": lambda t, m: _nan_held_out(t),
    "inf": lambda t, m: _edit(t, "inf.npz", z=_z_with(t, (5, 0), np.inf)),
    "wide": lambda t, m: _edit(t, "wide.npz", z=np.ones((60, 9))),
    "unknown_label": lambda t, m: _edit(t, "unknown.npz", y=np.r_[7, np.zeros(59, int)]),
    "singleton": lambda t, m: _singleton(t),
    "one_class": lambda t, m: _edit(t, "one.npz", y=np.zeros(60, int)),
    "empty_z": lambda t, m: _edit(t, "empty_z.npz", z=np.zeros((0, 6)), y=np.zeros(0, int)),
    "empty_file": lambda t, m: _file(t / "empty.npz"),
    "no_y": lambda t, m: _edit(t, "no_y.npz", y=None),
    "y_short": lambda t, m: _edit(t, "y_short.npz", y=np.zeros(59, int)),
    "z_1d": lambda t, m: _edit(t, "z_1d.npz", z=np.zeros(60)),
    "y_float": lambda t, m: _edit(t, "y_float.npz", y=np.arange(60) % 3 + 0.5),
    "y_nan": lambda t, m: _edit(t, "y_nan.npz", y=np.r_[np.nan, np.arange(59) % 3]),
    "few_per_class": lambda t, m: _edit(t, "few.npz", z=np.random.default_rng(0).normal(size=(15, 6)),
                                        y=np.arange(15) % 3),
    "absent": lambda t, m: t / "absent.npz",
    "a_file": lambda t, m: _file(t / "a_file.txt", "x"),
    "a_dir": lambda t, m: _folder(t / "a_dir"),
    "user_dir": lambda t, m: _folder(t / "docs", {"notes.txt": "mine"}),
    "nan_images": lambda t, m: _nan_images(t),
    "small_images": lambda t, m: _images(t, "small.npz", np.full((20, 4, 4), 0.5), np.arange(20) % 10),
    "label_images": lambda t, m: _images(t, "labels12.npz", np.full((20, 8, 8), 0.5), np.full(20, 12)),
    "corrupt_model": lambda t, m: _folder(t / "cm", {"pipeline.json": "{no"}),
    "keyless_model": lambda t, m: _folder(t / "km", {"pipeline.json": json.dumps(
        {"format": "gmcert-pipeline", "format_version": 1})}),
    "headless_model": lambda t, m: _model_copy(t, m, "hm", lambda p: (p / "head.npz").unlink()),
    "bad_mismatch_model": lambda t, m: _model_copy(t, m, "mm", lambda p: _file(p / "mismatch.json", "{")),
    "shrunk_model": lambda t, m: _model_copy(t, m, "sm", _retarget),
    "bad_partial": lambda t, m: _file(t / "r.tsv.partial", "a\tb\n1\t2\n").with_name("r.tsv"),
    "other_run": lambda t, m: _folder(t / "run", {"config.json": '{"sigma": 9}'}),
    "broken_run": lambda t, m: _folder(t / "brun", {"config.json": "{"}),
}


FIT = "fit --cache-dir '' --out {tmp}/model"
LAT = "--model {lat} --cache-dir ''"
RAW = "--model {raw} --cache-dir ''"
CERT_OUT = "--out {tmp}/r.tsv"
CMP = "compare --methods gm-exact,sequential --max-samples 60 --n-inputs 2"

CASES = [
    # fit: the three reported bugs first
    ("fit-nan", f"{FIT} --latents {{nan}}", "NaN"),
    ("fit-nan-held-out", f"{FIT} --latents {{nan_held_out}}", "NaN"),
    ("fit-singleton-class-held-out", f"{FIT} --latents {{singleton}}", "class 2 has 1 sample"),
    ("fit-singleton-class", f"{FIT} --latents {{singleton}} --test-size 0", "class 2 has 1 sample"),
    ("fit-inf", f"{FIT} --latents {{inf}}", "inf"),
    ("fit-one-class", f"{FIT} --latents {{one_class}}", "2 classes"),
    ("fit-empty-latents", f"{FIT} --latents {{empty_z}}", "no samples"),
    ("fit-empty-file", f"{FIT} --latents {{empty_file}}", "empty file"),
    ("fit-missing-y", f"{FIT} --latents {{no_y}}", "missing ['y']"),
    ("fit-y-length", f"{FIT} --latents {{y_short}}", "shape"),
    ("fit-z-1d", f"{FIT} --latents {{z_1d}}", "shape"),
    ("fit-float-labels", f"{FIT} --latents {{y_float}}", "integer"),
    ("fit-nan-labels", f"{FIT} --latents {{y_nan}}", "integer"),
    ("fit-no-file", f"{FIT} --latents {{absent}}", "no such"),
    ("fit-latents-is-folder", f"{FIT} --latents {{a_dir}}", "no such"),
    ("fit-out-is-file", "fit --cache-dir '' --latents {good} --out {a_file}", "existing file"),
    ("fit-out-is-user-folder", "fit --cache-dir '' --latents {good} --out {user_dir}", "not a gmcert model"),
    ("fit-out-under-file", "fit --cache-dir '' --latents {good} --out {a_file}/m", "not a folder"),
    ("fit-limit-0", f"{FIT} --latents {{good}} --limit 0", "--limit"),
    ("fit-limit-negative", f"{FIT} --latents {{good}} --limit -5", "--limit"),
    ("fit-test-size-1", f"{FIT} --latents {{good}} --test-size 1", "--test-size"),
    ("fit-test-size-negative", f"{FIT} --latents {{good}} --test-size -0.1", "--test-size"),
    ("fit-test-size-too-small", f"{FIT} --latents {{good}} --test-size 0.01", "--test-size"),
    ("fit-dim-0", f"{FIT} --latents {{good}} --projection pca --dim 0", "--dim"),
    ("fit-dim-above-width", f"{FIT} --latents {{good}} --projection pca --dim 50", "--dim"),
    ("fit-noise-sigma", f"{FIT} --latents {{good}} --noise-sigma -1", "--noise-sigma"),
    ("fit-noise-sigma-nan", f"{FIT} --latents {{good}} --noise-sigma nan", "--noise-sigma"),
    ("fit-noise-copies", f"{FIT} --latents {{good}} --noise-copies 0", "--noise-copies"),
    ("fit-shrinkage", f"{FIT} --latents {{good}} --shrinkage 2", "shrinkage"),
    ("fit-shrinkage-word", f"{FIT} --latents {{good}} --shrinkage lots", "shrinkage"),
    ("fit-reg-covar", f"{FIT} --latents {{good}} --reg-covar -1", "--reg-covar"),
    ("fit-components-0", f"{FIT} --latents {{good}} --components-per-class 0", "--components-per-class"),
    ("fit-components-too-many", f"{FIT} --latents {{good}} --components-per-class 40", "samples"),
    ("fit-batch-size", f"{FIT} --latents {{good}} --batch-size 0", "--batch-size"),
    ("fit-dim-not-int", f"{FIT} --latents {{good}} --dim abc", "--dim"),
    ("fit-radii", f"{FIT} --latents {{good}} --radii 0,-1", "radii"),
    ("fit-seed", f"{FIT} --latents {{good}} --seed -1", "--seed"),
    ("fit-device", f"{FIT} --latents {{good}} --device bogus", "--device"),
    ("fit-unknown-encoder", f"{FIT} --encoder no_such_card --limit 50", "no_such_card"),
    ("fit-nan-images", f"{FIT} --encoder identity --data {{nan_images}}", "NaN"),
    ("fit-no-image-file", f"{FIT} --encoder identity --data {{absent}}", "no such"),
    # certify
    ("certify-wide", f"certify {LAT} --latents {{wide}} {CERT_OUT}", "width"),
    ("certify-nan", f"certify {LAT} --latents {{nan}} {CERT_OUT}", "NaN"),
    ("certify-nan-default-out", f"certify {LAT} --latents {{nan}}", "NaN"),
    ("certify-unknown-label", f"certify {LAT} --latents {{unknown_label}} {CERT_OUT}", "not among the model's"),
    ("certify-empty-latents", f"certify {LAT} --latents {{empty_z}} {CERT_OUT}", "no samples"),
    ("certify-empty-file", f"certify {LAT} --latents {{empty_file}} {CERT_OUT}", "empty file"),
    ("certify-z-1d", f"certify {LAT} --latents {{z_1d}} {CERT_OUT}", "shape"),
    ("certify-missing-model", f"certify --model {{tmp}}/nope --latents {{good}} {CERT_OUT}", "missing"),
    ("certify-corrupt-model", f"certify --model {{corrupt_model}} --latents {{good}} {CERT_OUT}", "corrupt"),
    ("certify-model-without-keys", f"certify --model {{keyless_model}} --latents {{good}} {CERT_OUT}", "corrupt"),
    ("certify-model-without-head", f"certify --model {{headless_model}} --latents {{good}} {CERT_OUT}", "head.npz"),
    ("certify-model-is-file", f"certify --model {{a_file}} --latents {{good}} {CERT_OUT}", "not a gmcert model"),
    ("certify-source-shrunk", f"certify --model {{shrunk_model}} {CERT_OUT}", "held-out"),
    ("certify-out-is-folder", f"certify {LAT} --latents {{good}} --out {{a_dir}}", "is a folder"),
    ("certify-out-under-file", f"certify {LAT} --latents {{good}} --out {{a_file}}/r.tsv", "not a folder"),
    ("certify-foreign-partial", f"certify {LAT} --latents {{good}} --out {{bad_partial}}", "columns"),
    ("certify-limit-0", f"certify {LAT} --latents {{good}} {CERT_OUT} --limit 0", "--limit"),
    ("certify-sigma-0", f"certify {LAT} --latents {{good}} {CERT_OUT} --fallback smoothing --sigma 0", "sigma"),
    ("certify-alpha-0", f"certify {LAT} --latents {{good}} {CERT_OUT} --fallback smoothing --alpha 0", "alpha"),
    ("certify-alpha-1", f"certify {LAT} --latents {{good}} {CERT_OUT} --alpha 1.5", "alpha"),
    ("certify-max-samples", f"certify {LAT} --latents {{good}} {CERT_OUT} --fallback smoothing --max-samples 10",
     "--max-samples"),
    ("certify-target-radius", f"certify {LAT} --latents {{good}} {CERT_OUT} --target-radius -1", "--target-radius"),
    ("certify-device", f"certify {RAW} --data digits {CERT_OUT} --fallback smoothing --device bogus", "--device"),
    ("certify-threshold-undiagnosed", f"certify {LAT} --latents {{good}} {CERT_OUT} --fallback smoothing "
     "--mismatch-threshold 0.5", "diagnose"),
    ("certify-bad-mismatch-json", f"certify --model {{bad_mismatch_model}} --latents {{good}} {CERT_OUT} "
     "--fallback smoothing --mismatch-threshold 0.5", "mismatch.json"),
    ("certify-images-to-latent-model", f"certify {LAT} --data digits {CERT_OUT}", "--latents"),
    ("certify-latents-to-image-model", f"certify {RAW} --latents {{good}} {CERT_OUT}", "--data"),
    ("certify-image-size", f"certify {RAW} --data {{small_images}} {CERT_OUT}", "shape"),
    ("certify-image-labels", f"certify {RAW} --data {{label_images}} {CERT_OUT}", "not among the model's"),
    ("certify-nan-images", f"certify {RAW} --data {{nan_images}} {CERT_OUT}", "NaN"),
    # diagnose
    ("diagnose-nan", f"diagnose {LAT} --latents {{nan}} --out {{tmp}}/d", "NaN"),
    ("diagnose-nan-default-out", f"diagnose {LAT} --latents {{nan}}", "NaN"),
    ("diagnose-wide", f"diagnose {LAT} --latents {{wide}} --out {{tmp}}/d", "width"),
    ("diagnose-unknown-label", f"diagnose {LAT} --latents {{unknown_label}} --out {{tmp}}/d", "not among the model's"),
    ("diagnose-empty", f"diagnose {LAT} --latents {{empty_z}} --out {{tmp}}/d", "no samples"),
    ("diagnose-few-points", f"diagnose {LAT} --latents {{few_per_class}} --out {{tmp}}/d", "points"),
    ("diagnose-missing-model", "diagnose --model {tmp}/nope --latents {good} --out {tmp}/d", "missing"),
    ("diagnose-corrupt-model", "diagnose --model {corrupt_model} --latents {good} --out {tmp}/d", "corrupt"),
    ("diagnose-out-is-file", f"diagnose {LAT} --latents {{good}} --out {{a_file}}", "existing file"),
    ("diagnose-k-0", f"diagnose {LAT} --latents {{good}} --out {{tmp}}/d --k 0", "--k"),
    ("diagnose-bootstrap-0", f"diagnose {LAT} --latents {{good}} --out {{tmp}}/d --bootstrap 0", "--bootstrap"),
    ("diagnose-q-samples-0", f"diagnose {LAT} --latents {{good}} --out {{tmp}}/d --q-samples 0", "--q-samples"),
    ("diagnose-limit-0", f"diagnose {LAT} --latents {{good}} --out {{tmp}}/d --limit 0", "--limit"),
    ("diagnose-source-shrunk", "diagnose --model {shrunk_model} --out {tmp}/d", "held-out"),
    # compare
    ("compare-n-inputs-0", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --n-inputs 0", "--n-inputs"),
    ("compare-n-inputs-negative", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --n-inputs -3", "--n-inputs"),
    ("compare-alpha-0", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --alpha 0", "alpha"),
    ("compare-alpha-above-1", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --alpha 2", "alpha"),
    ("compare-sigma-0", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --sigma 0", "sigma"),
    ("compare-sigma-negative", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --sigma -1", "sigma"),
    ("compare-cohen-n-0", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --methods cohen --cohen-n 0", "cohen"),
    ("compare-cohen-n-word", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --cohen-n lots", "--cohen-n"),
    ("compare-max-samples-pilot", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --max-samples 20", "max_samples"),
    ("compare-unknown-method", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --methods bogus", "unknown method"),
    ("compare-radii", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --radii 0,-1", "radii"),
    ("compare-limit-0", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --limit 0", "--limit"),
    ("compare-out-is-file", f"{CMP} {LAT} --latents {{good}} --out {{a_file}}", "existing file"),
    ("compare-other-settings", f"{CMP} {LAT} --latents {{good}} --out {{other_run}}", "other settings"),
    ("compare-broken-config", f"{CMP} {LAT} --latents {{good}} --out {{broken_run}}", "config.json"),
    ("compare-device", f"{CMP} {RAW} --out {{tmp}}/c --device bogus", "--device"),
    ("compare-seed", f"{CMP} {LAT} --latents {{good}} --out {{tmp}}/c --seed -2", "--seed"),
    ("compare-missing-model", f"{CMP} --model {{tmp}}/nope --latents {{good}} --out {{tmp}}/c", "missing"),
    ("compare-nan", f"{CMP} {LAT} --latents {{nan}} --out {{tmp}}/c", "NaN"),
    ("compare-nan-default-out", f"{CMP} {LAT} --latents {{nan}}", "NaN"),
    ("compare-wide", f"{CMP} {LAT} --latents {{wide}} --out {{tmp}}/c", "width"),
    ("compare-unknown-label", f"{CMP} {LAT} --latents {{unknown_label}} --out {{tmp}}/c", "not among the model's"),
    ("compare-latents-to-image-model", f"{CMP} {RAW} --latents {{good}} --out {{tmp}}/c", "--data"),
]


class _Paths(dict):
    """``str.format_map`` source: known paths, and bad files made on first mention."""

    def __init__(self, tmp, models):
        super().__init__(tmp=str(tmp), lat=str(models / "lat"), raw=str(models / "raw"))
        self.tmp, self.models = tmp, models

    def __missing__(self, key):
        self[key] = str(MAKERS[key](self.tmp, self.models))
        return self[key]


def _listing(*roots) -> dict:
    """Every file and folder under ``roots``, hidden ones included, with a digest of each file."""
    found = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                found[os.path.join(folder, name)] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    found[path] = hashlib.sha256(handle.read()).hexdigest()
    return found


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own errors
        return exit.code


@pytest.mark.parametrize("template, message", [pytest.param(t, m, id=i) for i, t, m in CASES])
def test_bad_input_fails_cleanly(models, tmp_path, capsys, template, message):
    paths = _Paths(tmp_path, models)
    argv = ["" if token == "''" else token.format_map(paths) for token in template.split()]
    before = _listing(tmp_path, models)
    capsys.readouterr()

    code = _run(argv)

    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"gmcert {argv[0]}: error: "), lines[0]
    assert message.lower() in lines[0].lower(), lines[0]
    assert out == ""
    assert _listing(tmp_path, models) == before  # no file or folder made, none changed


def test_every_command_is_covered():
    assert {case[1].split()[0] for case in CASES} == {"fit", "certify", "diagnose", "compare"}

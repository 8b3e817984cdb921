"""A resumed run never merges rows computed on other content (issue 25, part 2).

The review killed a certify part-way, overwrote the data file at the same path with other images
and resumed with the same command: the old rows were kept, and certified accuracy read 0.30 where
0.00 was true. Resume settings now hold the content identity of every input a run reads.
"""
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from gmcert.cli import main
from gmcert.report import read_tsv

COMMON = ["--cache-dir", "", "--method", "smoothing", "--n-samples", "200", "--n0", "20"]


def _write_images(path, flip=False):
    digits = load_digits()
    x = (digits.images[:120] / 16.0).astype(np.float32)[:, None]
    np.savez(path, x=x[:, :, ::-1].copy() if flip else x, y=digits.target[:120])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    _write_images(root / "images.npz")
    assert main(["fit", "--data", str(root / "images.npz"), "--encoder", "identity", "--dim", "16",
                 "--out", str(root / "model"), "--cache-dir", ""]) == 0
    return root


def _killed_then_changed(model, tmp_path, interrupt_smoothing, args):
    """Run certify ``args``, kill it after 2 rows, overwrite the images with other ones."""
    arm, disarm = interrupt_smoothing
    arm(2)
    assert main(args) == 130
    disarm()
    _write_images(model / "images.npz", flip=True)


def test_resume_on_overwritten_data_is_refused(model, tmp_path, capsys, interrupt_smoothing):
    out = tmp_path / "c.tsv"
    args = ["certify", "--model", str(model / "model"), "--data", str(model / "images.npz"), "--limit", "5",
            "--out", str(out), *COMMON]
    try:
        _killed_then_changed(model, tmp_path, interrupt_smoothing, args)
        before = (tmp_path / "c.tsv.partial").read_text()
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "inputs" in err and "content" in err, err
        assert (tmp_path / "c.tsv.partial").read_text() == before and not out.exists()
    finally:
        _write_images(model / "images.npz")
    assert main(args) == 0 and len(read_tsv(out)) == 5  # the original content resumes


def test_resume_on_changed_held_out_data_is_refused(model, tmp_path, capsys, interrupt_smoothing):
    out = tmp_path / "held.tsv"
    args = ["certify", "--model", str(model / "model"), "--limit", "5", "--out", str(out), *COMMON]
    try:
        _killed_then_changed(model, tmp_path, interrupt_smoothing, args)
        capsys.readouterr()
        assert main(args) == 2
        assert "inputs" in capsys.readouterr().err
    finally:
        _write_images(model / "images.npz")


def test_resume_with_a_changed_mismatch_report_is_refused(model, tmp_path, capsys):
    from gmcert.cli.certify import resume_identity
    from gmcert.inputs import load_model, model_inputs
    from gmcert.cli import build_parser

    args = build_parser().parse_args(["certify", "--model", str(model / "model"), "--fallback", "smoothing",
                                      "--limit", "3", "--cache-dir", ""])
    pipeline = load_model(args.model)
    inputs, _ = model_inputs(args, pipeline, "test")
    without = resume_identity(args, inputs)
    (model / "model" / "mismatch.json").write_text(json.dumps({"classes": [], "kl_per_class": {}}))
    first = resume_identity(args, inputs)
    (model / "model" / "mismatch.json").write_text(json.dumps({"classes": [0], "kl_per_class": {}}))
    second = resume_identity(args, inputs)
    (model / "model" / "mismatch.json").unlink()
    assert len({json.dumps(without), json.dumps(first), json.dumps(second)}) == 3


def test_compare_rerun_on_overwritten_data_is_refused(model, tmp_path, capsys):
    args = ["compare", "--model", str(model / "model"), "--data", str(model / "images.npz"), "--n-inputs", "2",
            "--methods", "gm-exact,cohen", "--cohen-n", "50", "--n0", "10", "--out", str(tmp_path / "cmp"),
            "--cache-dir", ""]
    assert main(args) == 0
    try:
        _write_images(model / "images.npz", flip=True)
        capsys.readouterr()
        assert main(args) == 2
        assert "identity" in capsys.readouterr().err
    finally:
        _write_images(model / "images.npz")
    assert main(args) == 0


def test_train_resume_on_overwritten_data_is_refused(tmp_path):
    from gmcert.errors import DataError
    from gmcert.train.loop import TrainConfig
    from gmcert.train.workflow import train_model

    _write_images(tmp_path / "images.npz")
    args = dict(data=str(tmp_path / "images.npz"), encoder="gmcert_cnn",
                config=TrainConfig(epochs=2, sigma=0.25, batch_size=32), device="cpu", progress=False)
    train_model(tmp_path / "m", stop_after=1, **args)
    _write_images(tmp_path / "images.npz", flip=True)
    with pytest.raises(DataError, match="another run"):
        train_model(tmp_path / "m", **args)

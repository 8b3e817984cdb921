"""Lipschitz students (``gmcert train --student lipschitz``): the bound holds against a search for
the encoder's largest stretch, the certified radii hold against an attack on the float64 model and
are not vacuous, and the saved model keeps its bound, its predictions and its guard on the weights."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from attacks import attack, float64_module
from gmcert.cli import main
from gmcert.encoders.cards import load_encoder
from gmcert.bounds.rounding import ForwardErrorBound
from gmcert.errors import DataError, ModelFileError
from gmcert.inputs import load_inputs
from gmcert.pipeline import Pipeline
from gmcert.train import TrainConfig, train_model

LIMIT = 600  # the first 600 digits: every class, seconds of training


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("lipschitz") / "model"
    config = TrainConfig(method="margin", student="lipschitz", epochs=12, seed=0)
    pipeline, record = train_model(out, config=config, limit=LIMIT, device="cpu", progress=False)
    inputs = load_inputs({"data": "digits"}, channels=1, limit=LIMIT)
    test = np.asarray(pipeline.metadata["test_index"])
    return {"out": out, "pipeline": pipeline, "record": record, "x": inputs.x[test], "y": inputs.labels[test]}


def _largest_stretch(module, shape, starts=64, steps=60, seed=0):
    """A lower bound on the Lipschitz constant: ||f(x + d) - f(x)|| / ||d|| maximised over x and d by
    Adam from random starts (inputs in [0, 1], steps from 1e-3 to 1 in norm)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    x = torch.rand((starts, *shape), generator=gen, dtype=torch.float64).requires_grad_(True)
    d = torch.randn((starts, *shape), generator=gen, dtype=torch.float64)
    d = (d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * torch.logspace(-3, 0, starts, dtype=torch.float64)
         .view(-1, 1, 1, 1)).requires_grad_(True)
    optimizer = torch.optim.Adam([x, d], lr=0.01)
    best = 0.0
    for _ in range(steps):
        ratio = (module(x + d) - module(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        best = max(best, float(ratio.detach().max()))
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    return best


def _architectures(student):
    trained = student["pipeline"].encoder
    yield "gmcert_lipmlp, trained", trained, True
    for card in ("gmcert_lipnet", "gmcert_cnn"):
        yield f"{card}, random init", load_encoder(card, pretrained=False), False
    yield "gmcert_cnn_tiny, random init", load_encoder_tiny(), False


def load_encoder_tiny():
    from dataclasses import replace

    from gmcert.encoders.cards import load_card

    card = replace(load_card("gmcert_cnn"), name="tiny", architecture="gmcert_cnn_tiny", feature_dim=32)
    return load_encoder(card, pretrained=False)


def test_the_bound_holds_against_the_largest_stretch_found(student):
    for name, encoder, tight in _architectures(student):
        bound = ForwardErrorBound(encoder, (1, 8, 8)).lipschitz
        import copy

        found = _largest_stretch(copy.deepcopy(encoder), (1, 8, 8))
        assert found <= bound, (name, found, bound)
        if tight:  # orthogonal layers and GroupSort: the bound is about 1, and the search gets near it
            assert bound == pytest.approx(1.0, abs=1e-4), name
            assert found > 0.5 * bound, (name, found, bound)  # a bound off by 2x would fail above


def test_certified_radii_survive_an_attack_and_are_not_vacuous(student):
    pipeline, x, y = student["pipeline"], student["x"], student["y"]
    certs = pipeline.certify(x)
    assert {c.radius_kind for c in certs} == {"bound"}
    radius = np.array([c.radius for c in certs])
    pred = np.array([c.prediction for c in certs])
    keep = radius > 0.05
    assert keep.mean() > 0.7  # most held-out inputs get a useful radius from one pass
    module = float64_module(pipeline)
    index = torch.as_tensor(np.searchsorted(pipeline.head.classes_, pred[keep]))
    inside = attack(module, x[keep], index, radius[keep] * 0.999, steps=60, starts=4)
    assert not inside.any(), np.flatnonzero(inside)
    outside = attack(module, x[keep], index, radius[keep] * 1.5, steps=60, starts=4)
    assert outside.mean() > 0.5, outside.mean()
    assert np.mean((radius >= 0.25) & (pred == y)) > 0.6


def test_saving_keeps_the_bound_and_predictions_and_guards_the_weights(student, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(student["out"], out)
    loaded, original = Pipeline.load(out), student["pipeline"]
    x = student["x"][:40]
    assert loaded.input_lipschitz() == original.input_lipschitz()
    a, b = loaded.certify(x), original.certify(x)
    assert [(c.prediction, c.radius) for c in a] == [(c.prediction, c.radius) for c in b]

    weights = load_file(str(out / "encoder.safetensors"))
    weights["layers.0.weight"] = weights["layers.0.weight"] * 1.01  # L grows by 1%: a changed model
    save_file(weights, str(out / "encoder.safetensors"))
    with pytest.raises(ModelFileError, match="sha256"):
        Pipeline.load(out).certify(x)
    from gmcert.encoders.cards import file_sha256

    card = (out / "encoder.toml").read_text()
    old = next(line for line in card.splitlines() if line.startswith("sha256"))
    (out / "encoder.toml").write_text(card.replace(old, f'sha256 = "{file_sha256(out / "encoder.safetensors")}"'))
    with pytest.raises(ModelFileError, match="differs from the one this model was fitted with"):
        Pipeline.load(out).certify(x)


def test_cli_trains_a_student_and_compares_it_with_smoothing(tmp_path, capsys):
    common = ["--limit", "300", "--epochs", "3", "--device", "cpu"]
    assert main(["train", "--student", "lipschitz", "--out", str(tmp_path / "lip"), *common]) == 0
    printed = capsys.readouterr().out
    assert "input Lipschitz constant: 1.0000" in printed and "certified accuracy of the closed form" in printed
    assert main(["train", "--out", str(tmp_path / "noisy"), *common]) == 0
    assert main(["train", "--student", "lipschitz", "--teacher", str(tmp_path / "noisy"),  # latent distillation
                 "--out", str(tmp_path / "distilled"), *common]) == 0
    compute = json.loads((tmp_path / "distilled" / "train.json").read_text())["compute"]
    assert compute["teacher_forward"] == compute["student_forward_backward"] > 0
    assert main(["compare", "--model", str(tmp_path / "lip"), "--smoothing-model", str(tmp_path / "noisy"),
                 "--methods", "gm-exact,cohen", "--n-inputs", "4", "--cohen-n", "200", "--cache-dir", ""]) == 0
    summary = json.loads((tmp_path / "lip" / "compare" / "summary.json").read_text())
    assert set(summary["methods"]) == {"gm-exact", "cohen-n200-of-noisy"}
    assert summary["methods"]["gm-exact"]["mean_samples"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--student", "lipschitz", "--encoder", "gmcert_cnn"], "needs a Lipschitz architecture"),
    (["--student", "lipschitz", "--method", "gaussian"], "Lipschitz student trains by the margin method"),
    (["--method", "margin"], "Lipschitz student trains by the margin method"),
    (["--student", "lipschitz", "--margin", "0"], "--margin must be a positive number"),
    (["--student", "lipschitz", "--teacher", "efficientnet_lite0"], "takes 3-channel images, the training data has 1"),
])
def test_bad_student_arguments_fail_cleanly(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--limit", "200", "--epochs", "1", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_smoothing_model_for_other_inputs_is_refused(student, tmp_path, capsys):
    x, y = load_inputs({"data": "digits"}, channels=1, limit=400).x, load_inputs(
        {"data": "digits"}, channels=1, limit=400).labels
    keep = y < 5
    np.savez(tmp_path / "five.npz", x=x[keep], y=y[keep])
    assert main(["train", "--data", str(tmp_path / "five.npz"), "--epochs", "1", "--out", str(tmp_path / "five")]) == 0
    capsys.readouterr()
    assert main(["compare", "--model", str(student["out"]), "--smoothing-model", str(tmp_path / "five"),
                 "--out", str(tmp_path / "cmp"), "--cache-dir", ""]) == 2
    assert "must take the inputs --model takes" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(DataError):
        TrainConfig(method="margin", student="standard")


def test_a_smoothing_model_trained_on_the_compared_inputs_is_refused(student, tmp_path, capsys):
    """Another --seed holds out other images: smoothing it on --model's held-out split would certify
    images it was trained on."""
    assert main(["train", "--limit", str(LIMIT), "--epochs", "1", "--seed", "5", "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert main(["compare", "--model", str(student["out"]), "--smoothing-model", str(tmp_path / "other"),
                 "--out", str(tmp_path / "cmp"), "--cache-dir", ""]) == 2
    assert "was trained on some of the inputs being compared" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()

"""``gmcert train``: the losses against their formulas, each method against clean training under
noise, exact resume after a kill, the trained model as an ordinary gmcert model, and bad input.

The data are synthetic 1x8x8 images: one smooth random template per class plus a little pixel
jitter. A network trained on them without noise is fragile under sigma = 0.5 noise, while any of
the three methods is not, and ``gmcert_cnn_tiny`` learns them in a fraction of a second.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.ndimage import gaussian_filter
from scipy.special import log_softmax
from torch import nn

from attacks import attack, float64_module
from gmcert.cli import main
from gmcert.encoders.cards import CARDS_DIR
from gmcert.errors import DataError, ModelFileError
from gmcert.pipeline import Pipeline
from gmcert.train import TrainConfig, build_student, train_model, train_network
from gmcert.train.checkpoint import load_checkpoint, save_checkpoint
from gmcert.train.losses import consistency_loss, crt_loss, shaping_penalty
from gmcert.train.loop import evaluate
from gmcert.train.teacher import load_teacher

SIGMA = 0.5
MODEL_FILES = {"pipeline.json", "encoder.toml", "encoder.safetensors", "train.json", "training_curves.png"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _templates(n, classes=4, size=8, seed=0):
    """``(n, 1, size, size)`` float32 images in [0, 1] and labels ``0..classes-1``, classes in turn."""
    rng = np.random.default_rng(123)  # the same templates for every seed: seed only draws the jitter
    t = np.stack([gaussian_filter(rng.normal(size=(size, size)), 1.5, mode="wrap") for _ in range(classes)])
    t = 0.5 + 0.45 * t / np.abs(t).max(axis=(1, 2), keepdims=True)
    y = np.arange(n) % classes
    x = np.clip(t[y] + 0.03 * np.random.default_rng(seed).normal(size=(n, size, size)), 0, 1)
    return x[:, None].astype(np.float32), y


def _tensors(n, seed=0):
    x, y = _templates(n, seed=seed)
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    """A card for ``gmcert_cnn_tiny`` (the shipped card builds the 93k-parameter ``gmcert_cnn``)."""
    text = (CARDS_DIR / "gmcert_cnn.toml").read_text()
    for key, value in (("name", '"gmcert_cnn_tiny"'), ("architecture", '"gmcert_cnn_tiny"'), ("feature_dim", "32")):
        assert f'\n{key} = ' in text
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} = ") else line for line in text.splitlines())
    path = tmp_path_factory.mktemp("card") / "tiny.toml"
    path.write_text(text + "\n")
    return path


def _student(card, seed=0, classes=4):
    return build_student(str(card), classes, device="cpu", seed=seed)


# -- losses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [1.0, 0.3])
def test_crt_loss_is_its_formula_and_spares_the_teacher(w):
    rng = np.random.default_rng(0)
    s, t, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.integers(0, 4, 6)
    ce = -log_softmax(s, axis=1)[np.arange(6), y].mean()
    want = w * np.linalg.norm(s - t, axis=1).mean() + (1 - w) * ce
    got = crt_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), w)
    assert float(got) == pytest.approx(want, rel=1e-12)

    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 4), nn.Linear(5, 4)
    x = torch.randn(8, 5)
    crt_loss(student(x), teacher(x), torch.randint(0, 4, (8,)), w).backward()  # teacher(x) not detached here
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())


@pytest.mark.parametrize("weights", [{}, {"weight": 3.0, "entropy_weight": 0.7}])
def test_consistency_loss_is_its_formula(weights):
    lam, eta = weights.get("weight", 10.0), weights.get("entropy_weight", 0.5)  # {}: TrainConfig's defaults
    rng = np.random.default_rng(1)
    logits, y = rng.normal(scale=2.0, size=(3, 4, 5)), rng.integers(0, 5, 4)
    log_p = log_softmax(logits, axis=-1)
    p_bar = np.exp(log_p).mean(0)
    ce = -log_p[:, np.arange(4), y].mean()
    kl = (p_bar[None] * (np.log(p_bar)[None] - log_p)).sum(-1).mean()  # KL(p_bar || p_i), mean over i and b
    entropy = -(p_bar * np.log(p_bar)).sum(-1).mean()
    got = consistency_loss(torch.tensor(logits), torch.tensor(y), **weights)
    assert float(got) == pytest.approx(ce + lam * kl + eta * entropy, rel=1e-12)


def test_shaping_penalty_is_the_within_share_of_scatter_and_scale_free():
    rng = np.random.default_rng(2)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 0, 1])
    h = rng.normal(size=(12, 6)) + 2.0 * np.eye(3, 6)[y]
    means = np.stack([h[y == k].mean(0) for k in range(3)])
    want = ((h - means[y]) ** 2).sum() / ((h - h.mean(0)) ** 2).sum()
    penalty = float(shaping_penalty(torch.tensor(h), torch.tensor(y)))
    assert penalty == pytest.approx(want, rel=1e-12)
    assert 0 < penalty < 1
    for c in (1e-3, 7.5):
        assert float(shaping_penalty(torch.tensor(c * h), torch.tensor(y))) == pytest.approx(penalty, rel=1e-9)
    assert float(shaping_penalty(torch.tensor(means[y]), torch.tensor(y))) == pytest.approx(0.0, abs=1e-12)


# -- methods ---------------------------------------------------------------------------------
def test_each_method_beats_clean_training_under_noise(card):
    images, labels = _tensors(256)
    held_out = _tensors(400, seed=1)
    common = dict(epochs=8, batch_size=32, lr=1e-2, seed=0)

    def noisy_accuracy(method, sigma, teacher=None):
        student = _student(card)
        train_network(student, images, labels, TrainConfig(method=method, sigma=sigma, **common), teacher=teacher,
                      progress=False)
        clean, noisy = evaluate(student, *held_out, SIGMA, seed=5)
        return student, clean, noisy

    # sigma must be > 0: 1e-3 is clean training for all the network can tell at this contrast
    _, clean_acc, baseline = noisy_accuracy("gaussian", 1e-3)
    assert clean_acc > 0.95  # clean training learned the task; it only fails under noise
    gaussian, _, accuracy = noisy_accuracy("gaussian", SIGMA)
    results = {"gaussian": accuracy, "consistency": noisy_accuracy("consistency", SIGMA)[2]}
    teacher = load_teacher(gaussian, np.arange(4), (1, 8, 8), "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    results["crt"] = noisy_accuracy("crt", SIGMA, teacher)[2]
    # measured over 6 seeds: clean training 0.31..0.65 under noise, every method 0.89..0.93
    for method, accuracy in results.items():
        assert accuracy > baseline + 0.15, (method, accuracy, baseline)
        assert accuracy > 0.8, (method, accuracy)


# -- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gaussian", "consistency", "crt"])
def test_resume_after_a_kill_gives_the_uninterrupted_weights(card, tmp_path, method):
    images, labels = _tensors(96)
    held_out = _tensors(40, seed=1)
    config = TrainConfig(method=method, sigma=0.3, epochs=4, batch_size=32, lr=1e-2, shape_latents=True, seed=3)
    teacher = load_teacher(_student(card, seed=9), np.arange(4), (1, 8, 8), "cpu") if method == "crt" else None
    run = dict(teacher=teacher, held_out=held_out, progress=False)

    whole = _student(card)
    full = train_network(whole, images, labels, config, **run)
    checkpoint = tmp_path / "a.safetensors"
    first = train_network(_student(card), images, labels, config, checkpoint=checkpoint, stop_after=2, **run)
    assert first["epochs_done"] == 2 and checkpoint.is_file()
    resumed = _student(card, seed=1)  # another init: the checkpoint, not the init, must decide
    record = train_network(resumed, images, labels, config, checkpoint=checkpoint, **run)

    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4] and record["epochs_done"] == 4
    keys = ("loss", "clean_accuracy", "noisy_accuracy")
    assert [[h[k] for k in keys] for h in record["history"]] == [[h[k] for k in keys] for h in full["history"]]
    expected = whole.state_dict()
    assert expected.keys() == resumed.state_dict().keys()
    changed = [k for k, v in resumed.state_dict().items() if not torch.equal(v, expected[k])]
    assert changed == []


@pytest.fixture(scope="module")
def trained(card, tmp_path_factory):
    """A model trained by ``train_model``, killed after its first epoch and resumed; and a twin run whole."""
    root = tmp_path_factory.mktemp("trained")
    x, y = _templates(160)
    np.savez(root / "data.npz", x=x, y=y)
    config = TrainConfig(epochs=3, sigma=0.25, batch_size=32, lr=1e-2)
    args = dict(data=str(root / "data.npz"), encoder=str(card), config=config, device="cpu", progress=False)
    out, staging = root / "model", root / "model.train"
    torch.manual_seed(0)
    stopped, stopped_record = train_model(out, stop_after=1, **args)
    facts = {"stopped": stopped, "stopped_epochs": stopped_record["epochs_done"], "out_after_stop": out.exists(),
             "staging_after_stop": sorted(p.name for p in staging.iterdir())}
    pipeline, record = train_model(out, **args)
    torch.manual_seed(0)
    train_model(root / "whole", **args)
    return {"root": root, "out": out, "staging": staging, "data": root / "data.npz", "args": args,
            "pipeline": pipeline, "record": record, **facts}


def test_train_model_resumes_into_a_model_directory(trained):
    out = trained["out"]
    assert trained["stopped"] is None and trained["stopped_epochs"] == 1
    assert not trained["out_after_stop"] and trained["staging_after_stop"] == ["checkpoint.safetensors"]
    assert trained["pipeline"] is not None and trained["record"]["epochs_done"] == 3
    assert MODEL_FILES <= {p.name for p in out.iterdir()}
    assert not trained["staging"].exists()
    saved = json.loads((out / "train.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3]
    mine, whole = load_file(str(out / "encoder.safetensors")), load_file(str(trained["root"] / "whole" / "encoder.safetensors"))
    assert mine.keys() == whole.keys()
    assert [k for k in mine if not torch.equal(mine[k], whole[k])] == []


# The run follows its arguments only, not torch's global random state (the classifier's init is seeded).
def test_train_model_weights_follow_its_arguments_only(trained):
    torch.manual_seed(1)
    train_model(trained["root"] / "again", **trained["args"])
    again = load_file(str(trained["root"] / "again" / "encoder.safetensors"))
    whole = load_file(str(trained["root"] / "whole" / "encoder.safetensors"))
    assert [k for k in again if not torch.equal(again[k], whole[k])] == []


# -- the trained model is an ordinary gmcert model --------------------------------------------
def test_trained_model_certifies_and_compares(trained):
    out = trained["out"]
    pipeline = Pipeline.load(out, device="cpu")
    x, y = _templates(12, seed=4)
    certs = pipeline.certify(x)
    assert len(certs) == 12 and {c.radius_kind for c in certs} == {"bound"}
    assert all(np.isfinite(c.radius) and c.radius >= 0 for c in certs) and max(c.radius for c in certs) > 0
    accuracy = np.mean([c.prediction == label for c, label in zip(certs, y)])
    assert accuracy >= 0.75
    # an attack on the float64 model inside every reported radius changes no prediction
    radius, pred = np.array([c.radius for c in certs]), np.array([c.prediction for c in certs])
    index = torch.as_tensor(np.searchsorted(pipeline.head.classes_, pred))
    assert not attack(float64_module(pipeline), x, index, radius * 0.999, steps=40, starts=3).any()
    assert main(["certify", "--model", str(out), "--cache-dir", ""]) == 0
    assert (out / "certify.tsv").is_file()
    assert main(["compare", "--model", str(out), "--n-inputs", "3", "--cohen-n", "200", "--max-samples", "300",
                 "--cache-dir", ""]) == 0
    assert (out / "compare" / "summary.json").is_file()


def test_crt_trains_from_a_gmcert_teacher(trained, tmp_path, card):
    out = tmp_path / "student"
    assert main(["train", "--data", str(trained["data"]), "--encoder", str(card), "--epochs", "1", "--method", "crt",
                 "--teacher", str(trained["out"]), "--out", str(out)]) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["config"]["method"] == "crt" and record["compute"]["teacher_forward"] > 0


# -- bad input -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(trained, card):
    """Data and teachers that do not fit: a 3-class teacher, and 10x10 images (NHWC uint8)."""
    root = trained["root"]
    x, y = _templates(90, classes=3)
    np.savez(root / "three.npz", x=x, y=y)
    assert main(["train", "--data", str(root / "three.npz"), "--encoder", str(card), "--epochs", "1",
                 "--out", str(root / "three")]) == 0
    x, y = _templates(120, size=10)
    np.savez(root / "ten.npz", images=np.round(255 * x[:, 0, :, :, None]).astype(np.uint8), labels=y)
    return {"t3": root / "three", "t4": trained["out"], "d10": root / "ten.npz", "data": trained["data"]}


@pytest.mark.parametrize("extra, message", [
    (["--sigma", "0"], "--sigma"),
    (["--sigma", "-1"], "--sigma"),
    (["--epochs", "0"], "--epochs"),
    (["--method", "crt"], "teacher"),
    (["--teacher", "{t4}"], "crt"),
    (["--method", "crt", "--teacher", "{t3}"], "classes [0, 1, 2]"),
    (["--method", "crt", "--teacher", "{t4}", "--data", "{d10}"], "(1, 10, 10)"),
    (["--method", "crt", "--teacher", "{t4}/nowhere"], "nowhere"),
    (["--lr", "1e30"], "--lr"),  # the loss overflows in the first epoch: nothing to resume, nothing kept
])
def test_bad_train_input_fails_cleanly(bad, card, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["train", "--data", str(bad["data"]), "--encoder", str(card), "--epochs", "1", "--out", str(out)]
    assert main(argv + [a.format(**bad) for a in extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "gmcert train: error: " in errors[0], errors  # --lr 1e30: see the next test
    assert message.format(**bad) in errors[0].split("gmcert train: error: ", 1)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no out, no out.train


# An error raised inside the epoch loop gets its own line, not the progress bar's.
def test_error_during_training_is_on_its_own_line(bad, card, tmp_path, capsys):
    assert main(["train", "--data", str(bad["data"]), "--encoder", str(card), "--epochs", "1", "--lr", "1e30",
                 "--out", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("gmcert train: error: "), errors


def test_unknown_method_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--method", "foo", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "foo" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_is_named_and_kept(bad, card, tmp_path, capsys):
    staging = tmp_path / "out.train"
    staging.mkdir()
    garbage = b"\x00not a safetensors file" * 8
    (staging / "checkpoint.safetensors").write_bytes(garbage)
    assert main(["train", "--data", str(bad["data"]), "--encoder", str(card), "--epochs", "1",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"gmcert train: error: {staging / 'checkpoint.safetensors'}" in err and "corrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.train"]
    assert [p.name for p in staging.iterdir()] == ["checkpoint.safetensors"]
    assert (staging / "checkpoint.safetensors").read_bytes() == garbage


def test_checkpoint_of_another_network_or_run_is_refused(card, tmp_path):
    images, labels = _tensors(64)
    config = TrainConfig(epochs=2, batch_size=32)
    checkpoint = tmp_path / "c.safetensors"
    train_network(_student(card), images, labels, config, checkpoint=checkpoint, stop_after=1, progress=False)
    big = build_student("gmcert_cnn", 4, device="cpu")  # 32-64-128 channels where the file has 8-16-32
    with pytest.raises(ModelFileError, match=r"network\.features\.0\.weight has shape \(8, 1, 3, 3\)"):
        load_checkpoint(checkpoint, big, torch.optim.AdamW(big.parameters()))
    with pytest.raises(DataError, match="another run"):
        train_network(_student(card), images, labels, TrainConfig(epochs=2, batch_size=32, lr=5e-3),
                      checkpoint=checkpoint, progress=False)
    # the refusals changed nothing: the same run resumes from the file
    assert train_network(_student(card), images, labels, config, checkpoint=checkpoint,
                         progress=False)["epochs_done"] == 2
    save_checkpoint(checkpoint, big, torch.optim.AdamW(big.parameters()), {})  # and the reverse fit is refused
    small = _student(card)
    with pytest.raises(ModelFileError, match="has shape"):
        load_checkpoint(checkpoint, small, torch.optim.AdamW(small.parameters()))


def test_a_killed_train_command_resumes_to_the_uninterrupted_weights(card, tmp_path):
    """SIGKILL a real ``gmcert train`` process once its first checkpoint exists; rerunning the same
    command finishes the run, and its weights equal an uninterrupted run's, bit for bit."""
    import os
    import subprocess
    import sys
    import time

    from gmcert.train.checkpoint import read_checkpoint

    x, y = _templates(200)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    args = ["train", "--data", str(tmp_path / "data.npz"), "--encoder", str(card), "--epochs", "80",
            "--batch-size", "16", "--lr", "1e-2", "--device", "cpu"]
    out, checkpoint = tmp_path / "killed", tmp_path / "killed.train" / "checkpoint.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as this module's one torch thread
    process = subprocess.Popen([sys.executable, "-m", "gmcert", *args, "--out", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert checkpoint.exists() and not out.exists()
    done = read_checkpoint(checkpoint)[2]["epochs_done"]
    assert 1 <= done < 80  # killed mid-run
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    resumed, whole = load_file(str(out / "encoder.safetensors")), load_file(str(tmp_path / "whole" / "encoder.safetensors"))
    assert resumed.keys() == whole.keys()
    assert [k for k in whole if not torch.equal(resumed[k], whole[k])] == []
    history = json.loads((out / "train.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, 81))


def test_the_per_epoch_curve_watches_evenly_spaced_held_out_rows(card):
    """The curve is measured on ``monitor`` evenly spaced held-out rows (the rest cost a third of an
    epoch), and on every row with ``monitor=None``."""
    images, labels = _tensors(64)
    held_x, held_y = _tensors(60, seed=1)
    watched = torch.linspace(0, 59, 7).round().long()
    marked = torch.full_like(held_y, -1)  # a label no prediction equals, except on the watched rows
    marked[watched] = held_y[watched]
    config = TrainConfig(epochs=4, batch_size=16)
    student = _student(card)
    point = train_network(student, images, labels, config, held_out=(held_x, marked), monitor=7,
                          progress=False)["history"][-1]
    expected = evaluate(student, held_x[watched], held_y[watched], config.sigma, seed=config.seed + 40_000)
    assert (point["clean_accuracy"], point["noisy_accuracy"]) == expected
    assert expected[0] > 0.5  # the check above compares something
    every = train_network(_student(card), images, labels, config, held_out=(held_x, marked), monitor=None,
                          progress=False)["history"][-1]
    assert every["clean_accuracy"] <= 7 / 60


def test_max_steps_and_time_budget_end_the_run(card, tmp_path):
    """``--max-steps`` stops at that many optimizer steps, mid-epoch if need be, and the model is
    written; ``--time-budget`` stops once the loop's seconds reach it (here after one step)."""
    from gmcert.train.loop import epoch_lr, finished

    images, labels = _tensors(64)  # 4 steps an epoch at batch 16
    config = TrainConfig(epochs=10, batch_size=16, max_steps=6)
    record = train_network(_student(card), images, labels, config, progress=False)
    assert (record["steps"], record["epochs_done"]) == (6, 2) and finished(config, record)
    assert epoch_lr(config, 1, steps=4) == pytest.approx(0.5 * config.lr * (1 + np.cos(np.pi * 4 / 6)))
    quick = TrainConfig(epochs=10, batch_size=16, time_budget=1e-9)
    record = train_network(_student(card), images, labels, quick, progress=False)
    assert (record["steps"], record["epochs_done"]) == (1, 1)
    unlimited = train_network(_student(card), images, labels, TrainConfig(epochs=2, batch_size=16), progress=False)
    assert unlimited["steps"] == 8
    out = tmp_path / "m"
    x, y = _templates(80)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    assert main(["train", "--data", str(tmp_path / "data.npz"), "--encoder", str(card), "--max-steps", "3",
                 "--batch-size", "16", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "train.json").read_text())["steps"] == 3
    with pytest.raises(DataError, match="max_steps"):
        TrainConfig(max_steps=0)

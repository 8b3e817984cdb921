"""Deep-equilibrium encoders and serialized smoothing: a DEQ trains on digits to the issue's bar, its
warm-started fixed points converge to the cold-start ones as steps grow, and SRS certifies the
standard DEQ with every evaluation counted, never above what its own counts allow."""
import pytest
import torch

from gmcert.smoothing.serialized import serialized_lower_bound
from trained_deqs import model_copy, train_digits_deq


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def deq(tmp_path_factory):
    return train_digits_deq(tmp_path_factory, "gmcert_deq", epochs=12)


def test_a_deq_trains_on_digits_to_95_percent(deq):
    assert deq["record"]["network"]["clean_accuracy"] >= 0.95, deq["record"]["network"]
    assert deq["record"]["head"]["clean_accuracy"] >= 0.95, deq["record"]["head"]


def test_warm_started_fixed_points_converge_to_the_cold_ones(deq):
    net = deq["pipeline"].encoder.network.eval()
    x = torch.as_tensor(deq["x"][:16])
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = (x - 0.5) / 0.5  # the card's normalisation
        cold = net.forward_features(h)
        start = net.forward_features((noisy - 0.5) / 0.5)  # a neighbour's fixed point, as in a chain
        errors = []
        for steps in (1, 2, 4, 8, 16, 32):
            net.serial_state, net.serial_steps = start, steps
            errors.append(float((net.forward_features(h) - cold).flatten(1).norm(dim=1).mean()))
        net.serial_state = None
    assert all(b <= a * 1.001 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0], errors


def test_serialized_smoothing_counts_every_evaluation_and_follows_its_bound(deq):
    pipeline = deq["pipeline"]
    base = pipeline.torch_module()
    calls = [0]
    base.register_forward_hook(lambda module, inputs, output: calls.__setitem__(0, calls[0] + len(inputs[0])))
    from gmcert.smoothing.smoother import Smoother

    smoother = Smoother(base, num_classes=len(pipeline.head.classes_), sigma=0.25, batch_size=250, seed=0)
    n0, n, audit = 50, 2000, 300
    for i in range(3):
        calls[0] = 0
        cert = smoother.certify_serialized(torch.as_tensor(deq["x"][i]), n0, n, 0.01, steps=2, warmup_interval=4,
                                           audit_size=audit)
        assert cert.samples == calls[0] and n0 + n <= cert.samples <= n0 + n + audit
        extra = cert.extra
        p_lower, d_up = serialized_lower_bound(extra["n_a"], extra["audit_disagreements"], n, audit, 0.01)
        assert extra["disagreements_upper"] == int(d_up[0]) >= extra["audit_disagreements"]
        assert extra["p_lower"] == pytest.approx(float(p_lower[0]))
        assert cert.prediction == -1 or cert.prediction in pipeline.head.classes_
        # cold solves are 30 steps, warm ones 2: the chain spent far fewer than a cold chain would
        assert extra["solver_steps"] < 30 * (n0 + n + audit)
    assert not any(m.serial_state is not None for m in base.modules() if hasattr(m, "serial_state"))


def test_serialized_smoothing_needs_a_deq(deq):
    from gmcert.errors import DataError
    from gmcert.smoothing.smoother import Smoother

    smoother = Smoother(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), num_classes=3, sigma=0.25)
    with pytest.raises(DataError, match="deep-equilibrium"):
        smoother.certify_serialized(torch.rand(1, 8, 8), 10, 100, 0.01, audit_size=10)


def test_compare_runs_serialized_smoothing_on_a_deq(deq, tmp_path, capsys):
    import json
    import shutil

    from gmcert.cli import main
    from gmcert.report import read_tsv

    model = tmp_path / "deq"
    shutil.copytree(deq["pipeline"].bundled_files["encoder.toml"].parent, model)
    args = ["compare", "--model", str(model), "--methods", "cohen,srs", "--cohen-n", "600", "--srs", "1,2",
            "--audit-size", "100", "--n-inputs", "2", "--cache-dir", ""]
    assert main(args) == 0
    summary = json.loads((model / "compare" / "summary.json").read_text())
    assert set(summary["methods"]) == {"cohen-n600", "srs1-n600", "srs2-n600"}
    rows = read_tsv(model / "compare" / "srs1-n600.tsv")
    assert all(r["stop_reason"].startswith("serialized:solver_steps=") for r in rows)
    capsys.readouterr()
    assert main([*args[:-6], "--audit-size", "700", "--n-inputs", "2", "--cache-dir", "",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "audit_size <= every Cohen n" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def _model_dir(deq, tmp_path):
    return model_copy(deq, tmp_path, "deq")


def test_certify_smoothing_serialized_writes_rows_and_resumes(deq, tmp_path, capsys, interrupt_smoothing):
    from gmcert.cli import main
    from gmcert.report import read_tsv

    model = _model_dir(deq, tmp_path)
    args = ["certify", "--model", str(model), "--method", "smoothing", "--serialized", "--n-samples", "2500", "--n0", "20",
            "--audit-size", "400", "--steps", "2", "--limit", "3", "--cache-dir", ""]
    assert main([*args, "--out", str(tmp_path / "full.tsv")]) == 0
    full = read_tsv(tmp_path / "full.tsv")
    assert len(full) == 3 and all(r["stop_reason"].startswith("serialized:solver_steps=") for r in full)
    assert all(r["samples"] > 2520 and r["radius_kind"] == "probabilistic" for r in full)
    # each row's own figures: solver steps spent (the warm batches' far fewer than a cold solve's) and
    # the audit's disagreements over the warm samples it re-solved
    cold = deq["pipeline"].encoder.network.max_iter
    for r in full:
        fields = dict(f.split("=") for f in r["stop_reason"].split(":")[1].split(","))
        audited = int(fields["audit"].split("/")[1])
        assert 0 < audited < 400 and int(fields["solver_steps"]) < cold * r["samples"]
    # a run killed after its first row resumes to the same rows
    arm, disarm = interrupt_smoothing
    arm(1)
    assert main([*args, "--out", str(tmp_path / "cut.tsv")]) == 130
    disarm()
    assert main([*args, "--out", str(tmp_path / "cut.tsv")]) == 0
    again = read_tsv(tmp_path / "cut.tsv")
    drop = ("time", "latent_radius")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in full]


@pytest.mark.parametrize("extra, message", [
    (["--serialized"], "use it with --method smoothing"),
    (["--method", "smoothing", "--fallback", "smoothing"], "takes no --fallback"),
    (["--method", "smoothing", "--serialized", "--steps", "0"], "--steps must be a positive integer"),
])
def test_certify_smoothing_refuses_bad_use(deq, tmp_path, capsys, extra, message):
    from gmcert.cli import main

    model = _model_dir(deq, tmp_path)
    assert main(["certify", "--model", str(model), "--limit", "2", "--cache-dir", "", "--out",
                 str(tmp_path / "c.tsv"), *extra]) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.glob("c.*"))


def test_certify_serialized_refuses_a_model_without_a_deq(tmp_path, capsys):
    from gmcert.cli import main

    model = tmp_path / "m"
    assert main(["fit", "--data", "digits", "--encoder", "identity", "--out", str(model), "--cache-dir", ""]) == 0
    capsys.readouterr()
    assert main(["certify", "--model", str(model), "--method", "smoothing", "--serialized", "--n-samples", "100",
                 "--audit-size", "10", "--limit", "2", "--cache-dir", "", "--out", str(tmp_path / "c.tsv")]) == 2
    assert "deep-equilibrium" in capsys.readouterr().err and not list(tmp_path.glob("c.*"))

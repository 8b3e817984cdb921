"""Scale-out on torch.distributed, on CPUs with gloo: torchrun with 2 processes writes the same
certify and compare rows as 1 process, fit gives the same model, a killed rank loses nothing on
rerun, two local "nodes" sharing one rendezvous behave as one job, and bad use fails from rank 0."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gmcert.cli import main
from gmcert.report import read_tsv

TIMEOUT = 240


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(args, nproc=2, extra=(), background=False):
    """``torchrun --nproc-per-node N -m gmcert ARGS`` on this machine's loopback (a fresh port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               *(extra or ["--master-addr", "127.0.0.1", "--master-port", str(_port())]), "-m", "gmcert", *args]
    if background:
        return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _rows(path, drop=("time",)):
    return [{k: v for k, v in r.items() if k not in drop} for r in read_tsv(path)]


def _same_file_but_time(a, b):
    """Every column equal, byte for byte, but ``time``."""
    la, lb = Path(a).read_text().splitlines(), Path(b).read_text().splitlines()
    cut = la[0].split("\t").index("time")
    strip = lambda lines: ["\t".join(f for j, f in enumerate(line.split("\t")) if j != cut) for line in lines]
    return strip(la) == strip(lb)


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "raw"
    assert main(["fit", "--encoder", "identity", "--dim", "16", "--out", str(out), "--cache-dir", ""]) == 0
    return out


@pytest.mark.parametrize("method", [["--method", "exact"], ["--method", "smoothing", "--n-samples", "300", "--n0", "20"]],
                         ids=["closed-form", "smoothing"])
def test_two_processes_certify_the_same_rows_as_one(raw_model, tmp_path, method):
    common = ["certify", "--model", str(raw_model), "--limit", "9", "--cache-dir", "", *method]
    assert main([*common, "--out", str(tmp_path / "one.tsv")]) == 0
    done = torchrun([*common, "--out", str(tmp_path / "two.tsv")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert _same_file_but_time(tmp_path / "one.tsv", tmp_path / "two.tsv")
    assert len(read_tsv(tmp_path / "two.tsv")) == 9
    assert not list(tmp_path.glob("*.partial"))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["certified_accuracy"] == two["certified_accuracy"]


def test_two_processes_compare_the_same_rows_as_one(raw_model, tmp_path):
    common = ["compare", "--model", str(raw_model), "--methods", "gm-exact,cohen,sequential", "--cohen-n", "300",
              "--max-samples", "300", "--n-inputs", "5", "--cache-dir", ""]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*common, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("gm-exact", "cohen-n300", "sequential"):
        assert _same_file_but_time(tmp_path / "one" / f"{name}.tsv", tmp_path / "two" / f"{name}.tsv"), name
    assert (tmp_path / "two" / "summary.md").is_file() and not list((tmp_path / "two").glob("*.partial"))


def test_two_processes_fit_the_same_model_as_one(tmp_path):
    from gmcert.pipeline import Pipeline

    common = ["fit", "--encoder", "gmcert_cnn", "--no-pretrained", "--dim", "8", "--limit", "300",
              "--batch-size", "32", "--cache-dir", ""]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*common, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = Pipeline.load(tmp_path / "one"), Pipeline.load(tmp_path / "two")
    for a, b in ((one.head.means_, two.head.means_), (one.head.covariances_, two.head.covariances_),
                 (one.projection.components_, two.projection.components_)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def _worker_pids(marker: str) -> dict:
    """LOCAL_RANK -> pid of the torchrun workers whose command line holds ``marker``."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker.encode() in cmd and b"torch.distributed.run" not in b" ".join(cmd):
            for item in env:
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item.split(b"=")[1])] = int(proc.name)
    return found


def test_a_killed_rank_loses_nothing_on_rerun(raw_model, tmp_path):
    out = tmp_path / "cut.tsv"
    # long enough per rank (30 inputs of 100,000 draws, seconds) that the kill lands mid-run
    common = ["certify", "--model", str(raw_model), "--limit", "60", "--cache-dir", "", "--method", "smoothing",
              "--n-samples", "100000", "--n0", "20", "--out", str(out)]
    job = torchrun(common, background=True)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:  # kill rank 1 once it has written two rows
            part = tmp_path / "cut.tsv.rank1.partial"
            if part.is_file() and len(part.read_text().splitlines()) >= 4:
                break
            time.sleep(0.05)
        pids = _worker_pids(str(out))
        assert 1 in pids, pids
        os.kill(pids[1], signal.SIGKILL)
        job.wait(timeout=TIMEOUT)
    finally:
        job.kill()
    assert job.returncode != 0
    assert not out.exists()  # nothing merged: the rows wait in the partials
    kept = sum(len(p.read_text().splitlines()) - 2 for p in tmp_path.glob("cut.tsv.*partial"))
    assert 2 <= kept < 60
    done = torchrun(common)  # the rerun skips what is written
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    assert main([*common[:-1], str(tmp_path / "whole.tsv")]) == 0
    assert _same_file_but_time(out, tmp_path / "whole.tsv")
    assert [r["idx"] for r in read_tsv(out)] == sorted({r["idx"] for r in read_tsv(out)})  # no duplicates


def _two_nodes(args_0, args_1):
    """Two torchrun launches of one process each ("nodes" 0 and 1) sharing one c10d rendezvous."""
    endpoint = f"127.0.0.1:{_port()}"
    jobs = []
    for node, args in enumerate((args_0, args_1)):
        extra = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                 "--rdzv-id", "gmcert-test"]
        jobs.append(torchrun(args, nproc=1, extra=extra, background=True))
    return [(job.wait(timeout=TIMEOUT), *job.communicate()) for job in jobs]


def test_two_nodes_sharing_a_rendezvous_certify_as_one_process(raw_model, tmp_path):
    common = ["certify", "--model", str(raw_model), "--limit", "6", "--cache-dir", "", "--method", "smoothing",
              "--n-samples", "300", "--n0", "20"]
    assert main([*common, "--out", str(tmp_path / "one.tsv")]) == 0
    results = _two_nodes([*common, "--out", str(tmp_path / "nodes.tsv")], [*common, "--out", str(tmp_path / "nodes.tsv")])
    assert all(code == 0 for code, _, _ in results), [err[-1500:] for _, _, err in results]
    assert _same_file_but_time(tmp_path / "one.tsv", tmp_path / "nodes.tsv")


def test_ranks_started_with_other_seeds_are_refused_by_rank_0(raw_model, tmp_path):
    common = ["certify", "--model", str(raw_model), "--limit", "6", "--cache-dir", "", "--method", "smoothing",
              "--n-samples", "300", "--out", str(tmp_path / "c.tsv")]
    results = _two_nodes([*common, "--seed", "1"], [*common, "--seed", "2"])
    assert all(code != 0 for code, _, _ in results)
    err = results[0][2]
    assert "gmcert certify: error: the ranks of this torchrun job disagree" in err and "seed" in err, err[-1500:]
    assert not list(tmp_path.iterdir())


def test_a_partial_of_other_settings_is_refused(raw_model, tmp_path, capsys, interrupt_smoothing):
    common = ["certify", "--model", str(raw_model), "--limit", "4", "--cache-dir", "", "--method", "smoothing",
              "--n-samples", "200", "--out", str(tmp_path / "c.tsv")]
    arm, disarm = interrupt_smoothing
    arm(2)
    assert main(common) == 130
    disarm()
    before = (tmp_path / "c.tsv.partial").read_text()
    capsys.readouterr()
    assert main([*common, "--sigma", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other settings (sigma)" in err, err
    assert (tmp_path / "c.tsv.partial").read_text() == before and not (tmp_path / "c.tsv").exists()
    assert main(common) == 0 and len(read_tsv(tmp_path / "c.tsv")) == 4


def test_more_gpu_processes_than_gpus_are_refused():
    from gmcert.distributed.world import choose_device
    from gmcert.errors import DataError

    assert choose_device(None, 1, 2, 0) == "cpu"
    assert choose_device(None, 1, 2, 2) == "cuda:1"
    assert choose_device("cpu", 3, 4, 2) == "cpu"
    with pytest.raises(DataError, match="4 processes on this node but it has 2 GPU"):
        choose_device(None, 3, 4, 2)
    with pytest.raises(DataError, match="no GPU"):
        choose_device("cuda", 0, 1, 0)


def test_train_runs_data_parallel_with_the_global_batch_of_one_process(tmp_path):
    common = ["train", "--epochs", "4", "--limit", "300", "--head-copies", "1"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*common, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / n / "train.json").read_text()) for n in ("one", "two"))
    # the same samples per epoch in all (each rank a slice of every global batch), a working model
    assert one["compute"]["student_forward_backward"] == two["compute"]["student_forward_backward"]
    assert two["epochs_done"] == 4 and two["history"][-1]["clean_accuracy"] > 0.3
    assert not (tmp_path / "two.train").exists()


def test_torchrun_takes_none_of_gmcerts_options():
    """torchrun's parser reads abbreviations anywhere on the line: a gmcert option that is a prefix of
    one of torchrun's (``--n`` of ``--nnodes``) would be taken from gmcert, or refused as ambiguous."""
    import argparse

    from torch.distributed.run import get_args_parser

    from gmcert.cli import build_parser

    theirs = [o for action in get_args_parser()._actions for o in action.option_strings if o.startswith("--")]
    ours = set()
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                ours |= {o for a in sub._actions for o in a.option_strings if o.startswith("--")}
    stolen = sorted(o for o in ours - {"--help"} if any(t.startswith(o) for t in theirs))
    assert stolen == [] and len(ours) > 40, stolen
    # the check can fail: torchrun's own option names are prefixes of themselves
    assert any(t.startswith("--n") for t in theirs)

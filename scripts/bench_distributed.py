"""Benchmark: smoothing certification with 1 process against N processes under torchrun.

The same command, ``gmcert certify --method smoothing`` (Cohen's CERTIFY, n0 = 100, ``--n``
counted draws) on the same held-out digits inputs of a raw-pixel model, run once as one process
and once as ``torchrun --nproc-per-node N``, every process with one thread (``OMP_NUM_THREADS=1``).
It checks that both write the same rows (all columns but ``time``), then prints:

* inputs per second of the certification phase: the inputs over the busiest rank's summed row
  times (each row's ``time`` is that input's certification; rows go to ranks round-robin);
* inputs per second end to end (wall time of the command: imports, loading, process group, merge);
* the scaling efficiency, throughput ratio / process ratio, for both. Target: at least 0.90.

Usage: ``python scripts/bench_distributed.py`` (about 3 minutes on 2 cores; ``--nproc`` for more).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gmcert.report import parse_seconds, read_tsv


def _run(command, env) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--n-inputs", type=int, default=120)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--out", default="runs/bench-distributed")
    args = parser.parse_args(argv)
    out = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    gmcert = [sys.executable, "-m", "gmcert"]
    model = out / "model"
    if not (model / "pipeline.json").is_file():
        _run([*gmcert, "fit", "--encoder", "identity", "--dim", "32", "--out", str(model), "--cache-dir", ""], env)
    certify = ["certify", "--model", str(model), "--method", "smoothing", "--n-samples", str(args.n), "--n0", "100",
               "--limit", str(args.n_inputs), "--cache-dir", ""]
    for name in ("one.tsv", "many.tsv"):
        for stale in out.glob(name + "*"):
            stale.unlink()
    wall_one = _run([*gmcert, *certify, "--out", str(out / "one.tsv")], env)
    wall_many = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                      "--master-addr", "127.0.0.1", "--master-port", str(_port()), "-m", "gmcert", *certify,
                      "--out", str(out / "many.tsv")], env)
    one, many = read_tsv(out / "one.tsv"), read_tsv(out / "many.tsv")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
    same = strip(one) == strip(many)
    seconds_one = sum(parse_seconds(r["time"]) for r in one)
    per_rank = np.zeros(args.nproc)
    for position, row in enumerate(many):  # every input was to do: rank = position mod nproc
        per_rank[position % args.nproc] += parse_seconds(row["time"])
    n = len(one)
    phase = (n / per_rank.max()) / (n / seconds_one)
    end_to_end = wall_one / wall_many
    lines = [f"smoothing certification, {n} digits inputs, raw-pixel model (PCA 32, GM head), n0 100, n {args.n}, "
             f"one thread per process; {os.cpu_count()} CPU cores", "",
             "| processes | inputs/s (certification) | inputs/s (end to end) | efficiency (cert.) | "
             "efficiency (end to end) |", "|---|---|---|---|---|",
             f"| 1 | {n / seconds_one:.2f} | {n / wall_one:.2f} | 1 | 1 |",
             f"| {args.nproc} | {n / per_rank.max():.2f} | {n / wall_many:.2f} | {phase / args.nproc:.3f} | "
             f"{end_to_end / args.nproc:.3f} |", "",
             f"rows identical apart from time: {same}; busiest rank {per_rank.max():.1f} s of "
             f"{per_rank.sum():.1f} s summed (balance {per_rank.min() / per_rank.max():.3f})",
             f"target (efficiency >= 0.90 on the certification phase): "
             f"{'met' if phase / args.nproc >= 0.9 and same else 'NOT met'}"]
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: smoothing certification with 1 process against N processes under torchrun.

The same command, ``gmcert certify --method smoothing`` (Cohen's CERTIFY, n0 = 100, ``--n``
counted draws) on the same held-out digits inputs of a raw-pixel model, run once as one process
and once as ``torchrun --nproc-per-node N``, every process with one thread (``OMP_NUM_THREADS=1``).
It checks that both write the same rows (all columns but ``time``), then prints:

* inputs per second of the certification phase: the inputs over the busiest rank's summed row
  times (each row's ``time`` is that input's certification; rows go to ranks round-robin);
* inputs per second end to end (wall time of the command: imports, loading, process group, merge);
* the scaling efficiency, throughput ratio / process ratio, for both. Target: at least 0.90;
* a reference: N independent single processes (no torchrun, no communication), started together,
  each certifying ``n_inputs / N`` inputs: what the machine itself gives two busy processes
  (shared caches and memory bandwidth, a virtual machine's neighbours).

Every figure is a median over ``--repeats`` rounds in which the three runs alternate, with its range:
on a small virtual machine single rounds vary by a factor of two.

Usage: ``python scripts/bench_distributed.py`` (about 4 minutes on 2 cores; ``--nproc`` for more).
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
    parser.add_argument("--n-inputs", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
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
               "--cache-dir", ""]
    part = max(args.n_inputs // args.nproc, 1)
    names = ["one.tsv", "many.tsv", *[f"alone{r}.tsv" for r in range(args.nproc)]]
    busy = lambda name: sum(parse_seconds(r["time"]) for r in read_tsv(out / name))
    cut = lambda name: [line.split("\t")[:5] + line.split("\t")[6:] for line in (out / name).read_text().splitlines()]
    rounds, same = [], True
    for _ in range(args.repeats):  # the three runs alternate, so slow spells of the machine hit all of them
        for name in names:
            for stale in out.glob(name + "*"):
                stale.unlink()
        wall_one = _run([*gmcert, *certify, "--limit", str(args.n_inputs), "--out", str(out / "one.tsv")], env)
        wall_many = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                          "--master-addr", "127.0.0.1", "--master-port", str(_port()), "-m", "gmcert", *certify,
                          "--limit", str(args.n_inputs), "--out", str(out / "many.tsv")], env)
        alone = [subprocess.Popen([*gmcert, *certify, "--limit", str(part), "--out", str(out / f"alone{r}.tsv")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(args.nproc)]
        if any(job.wait() for job in alone):
            sys.exit("an independent reference process failed")
        same = same and cut("one.tsv") == cut("many.tsv")  # every column but time (column 6), as written
        per_rank = np.zeros(args.nproc)
        for position, row in enumerate(read_tsv(out / "many.tsv")):  # all to do: rank = position mod nproc
            per_rank[position % args.nproc] += parse_seconds(row["time"])
        single = args.n_inputs / busy("one.tsv")
        rounds.append({"single": single, "single_wall": args.n_inputs / wall_one,
                       "many": args.n_inputs / per_rank.max(), "many_wall": args.n_inputs / wall_many,
                       "alone": args.nproc * part / max(busy(f"alone{r}.tsv") for r in range(args.nproc))})
    med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
    eff = lambda key, base: [r[key] / r[base] / args.nproc for r in rounds]
    spread = lambda values: f"{np.median(values):.3f} ({min(values):.3f} to {max(values):.3f})"
    cert, wall, ceiling = eff("many", "single"), eff("many_wall", "single_wall"), eff("alone", "single")
    lines = [f"smoothing certification, {args.n_inputs} digits inputs, raw-pixel model (PCA 32, GM head), n0 100, "
             f"n {args.n}, one thread per process; {os.cpu_count()} CPU cores; medians (range) of {args.repeats} "
             "alternating rounds", "",
             "| processes | inputs/s (certification) | inputs/s (end to end) | efficiency (cert.) | "
             "efficiency (end to end) |", "|---|---|---|---|---|",
             f"| 1 | {med['single']:.2f} | {med['single_wall']:.2f} | 1 | 1 |",
             f"| {args.nproc} under torchrun | {med['many']:.2f} | {med['many_wall']:.2f} | {spread(cert)} | "
             f"{spread(wall)} |",
             f"| {args.nproc} independent processes, no torchrun (reference) | {med['alone']:.2f} | | "
             f"{spread(ceiling)} | |", "",
             f"rows identical apart from time in every round: {same}",
             f"target (efficiency >= 0.90 on the certification phase): "
             f"{'met' if np.median(cert) >= 0.9 and same else 'NOT met'} (median; the range shows how far one round "
             "can stray here)"]
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

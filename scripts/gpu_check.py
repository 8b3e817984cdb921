"""The measurements of ``scripts/gpu_check.sh`` (see there); each step prints one line as it ends,
and a failed step prints its error and the run goes on. Exit status: the number of failed steps.

``python scripts/gpu_check.py --device cpu --quick`` runs the same steps small, on the CPU (gloo for
torchrun): a rehearsal of the script where no GPU is at hand, not a measurement."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

RESULTS = []
DEVICE, QUICK, N = "cuda", False, "100000"


def step(name):
    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                line = fn(*args)
                RESULTS.append(f"ok    {name}: {line} ({time.perf_counter() - start:.1f} s)")
            except Exception as err:  # report and go on: one broken path must not hide the others
                traceback.print_exc()
                RESULTS.append(f"FAIL  {name}: {type(err).__name__}: {err}")
            print(RESULTS[-1], flush=True)
        return run
    return wrap


def gmcert(*args, env=None):
    done = subprocess.run([sys.executable, "-m", "gmcert", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return done


def rows_seconds(tsv):
    from gmcert.report import parse_seconds, read_tsv

    rows = read_tsv(tsv)
    return rows, sum(parse_seconds(r["time"]) for r in rows)


@step("encode (efficientnet_lite0 card, random init, 32 px images resized by the card)")
def encode(out):
    import torch

    from gmcert.encoders.cards import load_encoder
    from gmcert.encoders.encoding import encode as run

    encoder = load_encoder("efficientnet_lite0", pretrained=False, device=DEVICE)
    x = np.random.default_rng(0).random((64 if QUICK else 2048, 3, 32, 32), dtype=np.float32)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    run(encoder, x[:256], batch_size=256, device=DEVICE)  # warm-up
    sync()
    start = time.perf_counter()
    run(encoder, x, batch_size=256, device=DEVICE)
    sync()
    return f"{len(x) / (time.perf_counter() - start):.0f} images/s"


@step("fit + closed-form certify (gmcert fit, gmcert certify on the device)")
def closed_form(out):
    small = ["--limit", "120"] if QUICK else []
    gmcert("fit", "--no-pretrained", "--out", str(out / "model"), "--device", DEVICE, "--cache-dir", "", *small)
    start = time.perf_counter()
    gmcert("certify", "--model", str(out / "model"), "--device", DEVICE, "--out", str(out / "closed.tsv"),
           "--cache-dir", "", *small)
    rows, _ = rows_seconds(out / "closed.tsv")
    return f"{len(rows)} inputs in {time.perf_counter() - start:.1f} s end to end"


@step("smoothing certify (Cohen, n = 100,000, trained CNN base)")
def smoothing(out):
    gmcert("train", "--epochs", "3", "--out", str(out / "trained"), "--device", DEVICE, "--amp")
    gmcert("certify", "--model", str(out / "trained"), "--method", "smoothing", "--n-samples", N, "--limit",
           "4" if QUICK else "20", "--device", DEVICE, "--out", str(out / "smooth.tsv"), "--cache-dir", "")
    rows, seconds = rows_seconds(out / "smooth.tsv")
    return f"{sum(r['samples'] for r in rows) / seconds:.3g} noisy samples/s over {len(rows)} inputs"


@step("sequential engine and compare (gmcert compare --methods cohen,sequential)")
def sequential(out):
    gmcert("compare", "--model", str(out / "trained"), "--methods", "cohen,sequential", "--cohen-n", N,
           "--max-samples", N, "--n-inputs", "3" if QUICK else "10", "--device", DEVICE, "--out",
           str(out / "compare"), "--cache-dir", "")
    rows, seconds = rows_seconds(out / "compare" / "sequential.tsv")
    return f"{sum(r['samples'] for r in rows) / seconds:.3g} samples/s, {np.mean([r['samples'] for r in rows]):.0f} " \
           f"samples/input"


@step("verified serialized smoothing of a contractive DEQ (rows must equal Cohen's; TF32's unit on CUDA)")
def verified_srs(out):
    model = out / "cdeq"
    gmcert("train", "--encoder", "gmcert_cdeq", "--epochs", "3" if QUICK else "8", "--out", str(model),
           "--device", DEVICE)
    common = ["certify", "--model", str(model), "--method", "smoothing", "--n-samples", "10000", "--limit",
              "4" if QUICK else "10", "--device", DEVICE, "--cache-dir", ""]
    gmcert(*common, "--out", str(out / "cdeq-cohen.tsv"))
    gmcert(*common, "--serialized", "--verify", "--out", str(out / "cdeq-srs.tsv"))
    (cohen, t_cohen), (srs, t_srs) = rows_seconds(out / "cdeq-cohen.tsv"), rows_seconds(out / "cdeq-srs.tsv")
    same = all((a["predict"], a["radius"]) == (b["predict"], b["radius"]) for a, b in zip(cohen, srs))
    if not same or len(cohen) != len(srs):
        raise RuntimeError("verified SRS rows differ from Cohen's: a verified answer was not the standard DEQ's")
    proven = sum(int(r["stop_reason"].split("verified=")[1].split("/")[0]) for r in srs) / (10000 * len(srs))
    return f"rows identical to Cohen's on {len(srs)} inputs, {proven:.3f} of warm answers proven, " \
           f"{t_cohen / t_srs:.2f}x Cohen's speed"


@step("training step (bfloat16 autocast, 2 epochs of digits)")
def train(out):
    done = gmcert("train", "--epochs", "2", "--amp", "--device", DEVICE, "--out", str(out / "amp"))
    return done.stdout.strip().splitlines()[1]


@step("faiss on the GPU (mismatch estimator's neighbour search)")
def faiss_gpu(out):
    try:
        import faiss
    except ImportError:
        return "faiss not installed: skipped"
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return "faiss without GPU support (faiss-cpu): skipped"
    from gmcert.mismatch.entropy import knn_distances  # noqa: F401  (the path diagnose runs)

    gmcert("diagnose", "--model", str(out / "model"), "--out", str(out / "diagnose"))
    return f"faiss sees {faiss.get_num_gpus()} GPU(s); diagnose ran"


def _torchrun(nproc, out, name):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "gmcert", "certify", "--model", str(out / "trained"),
               "--method", "smoothing", "--n-samples", N, "--limit", str((2 if QUICK else 8) * nproc), "--out",
               str(out / name), "--cache-dir", ""]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    rows, _ = rows_seconds(out / name)
    from gmcert.report import parse_seconds

    busy = np.zeros(nproc)
    for position, row in enumerate(rows):
        busy[position % nproc] += parse_seconds(row["time"])
    return len(rows) / busy.max()


@step("torchrun on every GPU (smoothing certify, scaling from 1 GPU)")
def scaling(out, gpus):
    one = _torchrun(1, out, "tr1.tsv")
    if gpus == 1:
        return f"1 GPU: {one:.2f} inputs/s"
    many = _torchrun(gpus, out, f"tr{gpus}.tsv")
    return f"1 GPU {one:.2f} inputs/s, {gpus} GPUs {many:.2f} inputs/s: efficiency {many / one / gpus:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--gpus", type=int, default=1, help="processes for the torchrun step")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes: a rehearsal, not a measurement")
    args = parser.parse_args()
    global DEVICE, QUICK, N
    DEVICE, QUICK = args.device, args.quick
    N = "2000" if QUICK else "100000"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    encode(out)
    closed_form(out)
    smoothing(out)
    sequential(out)
    verified_srs(out)
    train(out)
    faiss_gpu(out)
    scaling(out, args.gpus)
    print("\n".join(["", "gpu_check summary:", *RESULTS]))
    return sum(line.startswith("FAIL") for line in RESULTS)


if __name__ == "__main__":
    raise SystemExit(main())

"""How the closed form's cost grows: time and peak memory of fit, encode and certify on Fashion-MNIST.

Each (head, size, phase) runs in a fresh subprocess, so that ``resource.getrusage``'s maxrss is that
phase's own peak; the images (float32, read from the IDX files in batches) are loaded before the
phase starts, and the peak is printed beside that starting point. Every phase prints its ratio
against a baseline measured in the same run:

  fit      the streamed fit against the in-memory fit it replaced (every latent in float64, PCA by
           SVD, the head on all rows), time and peak; its target: peak <= images + 500 MB;
  encode   ``Pipeline.latents`` against a plain ``model(x)`` loop on the same batches (cards only;
           target >= 0.9x the plain loop's throughput);
  certify  ``Pipeline.certify`` (certified pass, ball rounding, exact decisions) against the head's
           own ``certify`` on the latents (the closed form past the encoder).

Heads: ``raw`` (``--encoder identity``, PCA 64, full covariance) and ``lite0`` (``efficientnet_lite0``
at 32 px: the card with ``input_size = [3, 32, 32]``, grey images repeated as a view to 3 channels).
The growth exponent is the log-log slope of time (and of the peak above the starting point) over sizes.

    python scripts/bench_scale.py [--sizes 10000,30000,60000] [--heads raw,lite0] [--phases fit,encode,certify]
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 2 ** 20
ROOT = Path(__file__).resolve().parent.parent


def _rss_mb():
    """Resident set now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _card_path(workdir):
    """efficientnet_lite0's card at 32 px, written beside the run (the weights stay the package's)."""
    text = (ROOT / "encoders" / "efficientnet_lite0.toml").read_text()
    text = text.replace('name = "efficientnet_lite0"', 'name = "efficientnet_lite0_32"')
    text = text.replace("input_size = [3, 224, 224]", "input_size = [3, 32, 32]")
    path = Path(workdir) / "efficientnet_lite0_32.toml"
    path.write_text(text)
    return str(path)


def _pipeline(head, workdir):
    from gmcert.latent.mixture import GaussianMixtureClassifier
    from gmcert.pipeline import Pipeline

    gm = GaussianMixtureClassifier(covariance_type="full", shrinkage="ledoit_wolf")
    encoder = "identity" if head == "raw" else _card_path(workdir)
    return Pipeline(encoder=encoder, n_components=64, head=gm, batch_size=256, device="cpu")


def _in_memory_fit(pipe, X, y):
    """The fit as it was before streaming: every latent in float64, PCA by SVD, the head on all rows."""
    from gmcert.encoders.projection import make_projection

    pipe.projection = make_projection("pca", pipe.n_components)
    pipe.head.fit(pipe.projection.fit_transform(pipe.raw_latents(X)), y)
    pipe.input_shape_ = tuple(X.shape[1:])
    return pipe


def _plain_loop(model, X, batch_size):
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            out.append(model(X[start:start + batch_size].to(torch.float32)).cpu())
    return torch.cat(out)


def _warm_up(pipe, phase, model_dir, X, y):
    """The phase once on 300 rows first: imports, thread pools and lazily built parts are then
    in place, and neither the clock nor the peak above the starting point counts them."""
    import copy

    from gmcert.pipeline import Pipeline

    if phase in ("fit", "fit-in-memory"):
        copy.deepcopy(pipe).fit(X[:300], y[:300])
        _in_memory_fit(copy.deepcopy(pipe), X[:300], y[:300])
    else:
        warm = Pipeline.load(model_dir, device="cpu")
        warm.certify(X[:64]) if phase == "certify" else warm.latents(X[:300])


def child(head, n, phase, workdir):
    """One phase in this fresh process; prints one JSON line."""
    from gmcert.data.fashion_mnist import load_fashion_mnist
    from gmcert.pipeline import Pipeline

    X, y, _ = load_fashion_mnist("train", limit=n)
    if head != "raw":
        X = X.expand(-1, 3, -1, -1)  # a view: the card takes 3 channels, no copy of the images
    images_mb = n * 28 * 28 * 4 / MB
    pipe = _pipeline(head, workdir)
    if head != "raw":
        _ = pipe.encoder  # build (and load weights) before the clock and the starting point
    model_dir = Path(workdir) / f"{head}-{n}"
    _warm_up(pipe, phase, model_dir, X, y)
    start_rss = _rss_mb()
    t0 = time.perf_counter()
    record = {"head": head, "n": n, "phase": phase, "images_mb": images_mb, "start_rss_mb": start_rss}
    if phase in ("fit", "fit-in-memory"):
        (pipe.fit(X, y) if phase == "fit" else _in_memory_fit(pipe, X, y))
        record["seconds"] = time.perf_counter() - t0
        if phase == "fit":
            pipe.save(model_dir)
    else:
        pipe = Pipeline.load(model_dir, device="cpu")
        if phase == "encode":
            Z = pipe.latents(X)
            record["seconds"] = time.perf_counter() - t0
            if head != "raw":  # the same module, the same batches, no gmcert in between
                t1 = time.perf_counter()
                plain = _plain_loop(pipe.encoder, X, pipe.batch_size)
                record["plain_seconds"] = time.perf_counter() - t1
                record["max_diff"] = float(np.abs(pipe.projection.transform(plain.double().numpy()) - Z).max())
        elif phase == "certify":
            certs = pipe.certify(X)
            record["seconds"] = time.perf_counter() - t0
            Z = pipe.latents(X)
            t1 = time.perf_counter()
            pipe.head.certify(Z)
            record["head_seconds"] = time.perf_counter() - t1
            record["mean_radius"] = float(np.mean([c.radius for c in certs]))
    record["peak_rss_mb"] = _peak_mb()
    print(json.dumps(record), flush=True)


def run_child(head, n, phase, workdir):
    out = subprocess.run([sys.executable, __file__, "--child", head, str(n), phase, workdir],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{head} n={n} {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(ns, values):
    """Log-log slope of ``values`` over ``ns`` (the growth exponent); nan with fewer than 2 sizes."""
    ns, values = np.asarray(ns, float), np.maximum(np.asarray(values, float), 1e-9)
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0]) if len(ns) > 1 else float("nan")


def report(head, phase, rows):
    """One line per size, then the growth exponents."""
    ns = [r["n"] for r in rows]
    for r in rows:
        extra = r["peak_rss_mb"] - r["start_rss_mb"]
        line = (f"{head:>5} {phase:<13} n={r['n']:>6}  {r['seconds']:8.2f} s  {r['n'] / r['seconds']:10.0f} /s  "
                f"peak {r['peak_rss_mb']:7.0f} MB (start {r['start_rss_mb']:6.0f}, +{extra:6.0f}; images "
                f"{r['images_mb']:5.0f} MB)")
        if "plain_seconds" in r:
            line += (f"  plain loop {r['n'] / r['plain_seconds']:.0f} /s, throughput ratio "
                     f"{r['plain_seconds'] / r['seconds']:.3f} (target >= 0.9), max |dz| {r['max_diff']:.1e}")
        if "head_seconds" in r:
            line += f"  head only {r['n'] / r['head_seconds']:.0f} /s (ratio {r['head_seconds'] / r['seconds']:.3f})"
        print(line, flush=True)
    print(f"{head:>5} {phase:<13} growth exponent: time {slope(ns, [r['seconds'] for r in rows]):.2f}, "
          f"peak above start {slope(ns, [r['peak_rss_mb'] - r['start_rss_mb'] for r in rows]):.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,30000,60000", help="comma-separated training sizes")
    parser.add_argument("--heads", default="raw,lite0", help="raw and/or lite0")
    parser.add_argument("--phases", default="fit,encode,certify")
    parser.add_argument("--child", nargs=4, metavar=("HEAD", "N", "PHASE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        head, n, phase, workdir = args.child
        return child(head, int(n), phase, workdir)
    sizes = [int(s) for s in args.sizes.split(",")]
    phases = args.phases.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_scale-") as workdir:
        for head in args.heads.split(","):
            rows = {p: [] for p in ["fit", "fit-in-memory"] + phases}
            for n in sizes:
                for phase in ["fit", "fit-in-memory"] + [p for p in phases if p != "fit"]:
                    rows[phase].append(run_child(head, n, phase, workdir))
            for phase in ["fit", "fit-in-memory"] + [p for p in phases if p != "fit"]:
                report(head, phase, rows[phase])
            for new, old in zip(rows["fit"], rows["fit-in-memory"]):
                print(f"{head:>5} fit n={new['n']:>6}: streamed/in-memory time {new['seconds'] / old['seconds']:.2f}, "
                      f"peak above start {new['peak_rss_mb'] - new['start_rss_mb']:.0f} vs "
                      f"{old['peak_rss_mb'] - old['start_rss_mb']:.0f} MB; peak {new['peak_rss_mb']:.0f} MB "
                      f"(start without the images {new['start_rss_mb'] - new['images_mb']:.0f} MB + images + 500 MB"
                      f" = {new['start_rss_mb'] + 500:.0f}: {'met' if new['peak_rss_mb'] <= new['start_rss_mb'] + 500 else 'MISSED'})",
                      flush=True)


if __name__ == "__main__":
    main()

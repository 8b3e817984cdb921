"""Benchmark: what the Gaussian-mixture head is fitted on, clean or noisy latents, does to each route.

A noise-trained base has seen only noisy images, and smoothing feeds it only noisy ones, while the
closed form and the hybrid route certify the head on clean inputs (issue 26). For one trained base
(default: ``bench_fmnist.py``'s LeNet, Gaussian sigma 0.25) and for the raw-pixel head
(``--encoder identity``, PCA 64), the head is refitted three ways on the same training rows:

* ``clean``  the clean images' latents;
* ``noisy``  ``--copies`` noisy copies of each image at sigma (``gmcert train``'s default, 4 copies);
* ``mixed``  the clean images and the noisy copies together.

Each is measured on a validation split of the training data, never on test images: the base's own
held-out rows (every k-th, ``--inputs`` of them). Columns: clean accuracy of the head itself (what
``predict`` and the closed form answer), the closed form's certified accuracy at r = 0.25 and 0.5
(``exact`` on raw pixels, ``bound`` through a network), and Cohen's CERTIFY of the smoothed head at
sigma (n0 = 100, ``--n``, alpha = 0.001): certified accuracy at r = 0, 0.25, 0.5 and ACR. Usage:
``python scripts/bench_head_fit.py`` (about 10 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gmcert.inputs import load_inputs
from gmcert.pipeline import Pipeline

RADII = (0.0, 0.25, 0.5)


def fits(x, y, sigma, copies, seed):
    """``{name: (images, labels)}`` of the three fits."""
    rng = np.random.default_rng(seed)
    noisy = np.concatenate([x + rng.normal(0.0, sigma, x.shape).astype(np.float32) for _ in range(copies)])
    return {"clean": (x, y), "noisy": (noisy, np.tile(y, copies)),
            "mixed": (np.concatenate([x, noisy]), np.tile(y, copies + 1))}


def smoothing(pipeline, x, y, sigma, n, seed):
    smoother = pipeline.smoother(sigma, seed)
    radius = np.zeros(len(x))
    for i in tqdm(range(len(x)), desc="certify", unit="input", leave=False):
        cert = pipeline.label_smoothed(smoother.certify(torch.as_tensor(x[i]), n0=100, n=n, alpha=0.001))
        radius[i] = cert.radius if cert.prediction == y[i] else -1.0
    return [float(np.mean(radius >= r)) for r in RADII], float(np.mean(np.maximum(radius, 0.0)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/bench-fmnist/models/lenet-gaussian-0.25",
                        help="a model directory written by `gmcert train` (its data, split and sigma are used)")
    parser.add_argument("--inputs", type=int, default=300, help="validation rows measured")
    parser.add_argument("--n", type=int, default=10_000, help="Cohen's n")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-head-fit")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    base = Pipeline.load(args.model)
    meta = base.metadata
    sigma = float(meta["noise_sigma"])
    data = load_inputs({"data": meta["data"]}, channels=int(meta["channels"]))
    held = np.asarray(meta["test_index"], dtype=np.int64)
    train = np.setdiff1d(np.arange(len(data.labels)), held)
    val = held[:: max(1, len(held) // args.inputs)][: args.inputs]
    x_val, y_val = data.x[val], data.labels[val]
    encoders = {"network": str(Path(args.model) / "encoder.toml"), "identity": "identity"}
    lines = [f"{meta['data']}: heads refitted on {len(train)} training rows; measured on {len(val)} validation rows "
             f"(held out of the training split); sigma {sigma}; Cohen n0 = 100, n = {args.n}, alpha = 0.001", "",
             "| encoder | head fitted on | clean acc | closed form r=0.25 | r=0.5 | kind | smoothing r=0 | r=0.25 | "
             "r=0.5 | smoothing ACR |", "|" + "---|" * 10]
    record = {}
    for enc_name, encoder in encoders.items():
        for fit_name, (x, y) in fits(data.x[train], data.labels[train], sigma, args.copies, args.seed).items():
            pipeline = Pipeline(encoder=encoder, projection="pca", n_components=64, pretrained=True).fit(x, y)
            clean = float(np.mean(pipeline.predict(x_val, arithmetic="fast") == y_val))
            certs = pipeline.certify(x_val)
            closed = [float(np.mean([(c.prediction == t) and c.radius >= r for c, t in zip(certs, y_val)]))
                      for r in (0.25, 0.5)]
            smooth, acr = smoothing(pipeline, x_val, y_val, sigma, args.n, args.seed)
            record[f"{enc_name}/{fit_name}"] = {"clean": clean, "closed": closed, "smoothing": smooth, "acr": acr}
            lines.append(f"| {enc_name} | {fit_name} | {clean:.3f} | {closed[0]:.3f} | {closed[1]:.3f} | "
                         f"{'/'.join(sorted({c.radius_kind for c in certs}))} | "
                         + " | ".join(f"{a:.3f}" for a in smooth) + f" | {acr:.3f} |")
            print(lines[-1], flush=True)
    lines += ["", f"took {time.perf_counter() - began:.0f} s"]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

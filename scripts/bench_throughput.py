"""Benchmark: a `gmcert train` epoch against a plain PyTorch loop, like for like.

Same network (LeNet-5: gmcert's ``--arch lenet`` card against the same layers written out as an
``nn.Sequential``, normalised as the card does), same batch size (64), optimizer (AdamW at gmcert's
learning rate and weight decay), Gaussian noise at sigma, data (the training rows of ``gmcert
train``'s split: 75% of ``--data``, seed 0) and threads. The two run interleaved in this process,
``--rounds`` times, the order alternating (plain first, then gmcert first), because the machine is
shared and its speed drifts; the figure is the median of the per-round ratios.

The gmcert epoch is the whole of what ``gmcert train`` does per epoch: ``train_network`` with its
per-epoch curve measured (clean and noisy accuracy on ``MONITOR`` = 2,000 evenly spaced held-out rows,
each round its share of them) and the checkpoint written atomically. Its training loop alone (the record's ``seconds``) is printed too. The issue's target
is a ratio of at most 1.3. Run by ``python scripts/bench_train.py --throughput`` (or this file);
the defaults (all 60,000 Fashion-MNIST training images: one epoch of each, in 12 rounds) take
about 2 to 4 minutes on 2 cores and print the time they took, and what ``gmcert train --arch lenet``'s defaults would take.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gmcert.inputs import fit_split, load_inputs
from gmcert.train import TrainConfig, build_student, train_network
from gmcert.train.loop import MONITOR


def plain_lenet(classes: int, side: int = 28) -> nn.Module:
    """LeNet-5 as a user writes it: conv 6 - pool - conv 16 - pool - fc 120 - fc 84 - classifier."""
    flat = 16 * (((side - 4) // 2 - 4) // 2) ** 2
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, classes))


def plain_epoch(x, y, config: TrainConfig, seed: int) -> float:
    """One epoch of the plain loop from a fresh network; seconds."""
    torch.manual_seed(seed)
    model = plain_lenet(int(y.max()) + 1, x.shape[-1]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = time.perf_counter()
    for index in torch.randperm(len(x)).split(config.batch_size):
        batch = x[index]
        noisy = batch + config.sigma * torch.randn_like(batch)
        loss = nn.functional.cross_entropy(model((noisy - 0.5) / 0.5), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def gmcert_epoch(x, y, held, config: TrainConfig, folder: Path) -> tuple[float, float]:
    """One ``gmcert train`` epoch from a fresh student: (whole epoch, training loop alone) in seconds."""
    checkpoint = folder / "checkpoint.safetensors"
    checkpoint.unlink(missing_ok=True)
    student = build_student("lenet", int(y.max()) + 1, tuple(x.shape[-2:]), device="cpu", seed=config.seed)
    start = time.perf_counter()
    record = train_network(student, x, y, config, checkpoint=checkpoint, held_out=held, progress=False)
    return time.perf_counter() - start, record["history"][0]["seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist:train")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--rounds", type=int, default=12,
                        help="the training rows are cut into this many slices; each round trains both loops one "
                             "epoch on one slice, so the rounds add up to one epoch each (default 12)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = load_inputs({"data": args.data}, channels=1, limit=args.limit, root=args.data_root)
    classes, y_all = np.unique(inputs.labels, return_inverse=True)
    train, test = fit_split(inputs.labels, 0.25, 0)  # gmcert train's default split
    images, labels = torch.as_tensor(inputs.x, dtype=torch.float32), torch.as_tensor(y_all, dtype=torch.long)
    x, y, held = images[train].contiguous(), labels[train].contiguous(), (images[test], labels[test])
    config = TrainConfig(method="gaussian", sigma=args.sigma, epochs=1, batch_size=args.batch_size)
    print(f"{args.data}: {len(x)} training images {tuple(x.shape[1:])}, {len(test)} held out; batch "
          f"{args.batch_size}, sigma {args.sigma}, AdamW lr {config.lr}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} interleaved rounds", flush=True)
    rows = []
    slices = np.array_split(np.arange(len(x)), args.rounds)
    # an epoch measures its curve on MONITOR evenly spaced held-out rows; each round takes its share
    watched = np.linspace(0, len(held[0]) - 1, min(MONITOR, len(held[0]))).round().astype(int)
    held_slices = np.array_split(watched, args.rounds)
    with tempfile.TemporaryDirectory() as folder:
        for r, (part, held_part) in enumerate(zip(slices, held_slices)):
            xs, ys, hs = x[part], y[part], (held[0][held_part], held[1][held_part])
            runs = [lambda: plain_epoch(xs, ys, config, seed=r), lambda: gmcert_epoch(xs, ys, hs, config, Path(folder))]
            measured = {}
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                measured[k] = runs[k]()
            plain, (whole, loop) = measured[0], measured[1]
            rows.append((plain, whole, loop))
            print(f"round {r + 1}: {len(part)} images: plain {plain:.2f} s, gmcert train {whole:.2f} s "
                  f"(loop alone {loop:.2f}): ratio {whole / plain:.3f} (loop {loop / plain:.3f})", flush=True)
    plain, whole, loop = (sum(v) for v in zip(*rows))
    ratio = statistics.median(w / p for p, w, _ in rows)
    loop_ratio = statistics.median(lp / p for p, _, lp in rows)
    print(f"\none epoch in all (sum of the rounds): plain PyTorch loop {plain:.1f} s, gmcert train {whole:.1f} s "
          f"(training loop alone {loop:.1f}); ratio of the sums {whole / plain:.3f}")
    print(f"ratio gmcert / plain (median of rounds): {ratio:.3f} whole epoch, {loop_ratio:.3f} loop alone; "
          f"target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'}")
    print(f"gmcert train --arch lenet defaults (30 epochs) on these images: about {30 * whole / 60:.1f} min "
          "of epochs, plus the head's refit")
    print(f"this benchmark took {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

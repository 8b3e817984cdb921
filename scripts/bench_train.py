"""Benchmark: `gmcert train` against a plain noise-augmentation script, certified the same way.

digits (1x8x8 pixels in [0, 1]), the split `gmcert fit`/`train` use (25% held out, seed 0),
sigma = 0.25. Every model is certified by Cohen et al.'s CERTIFY (n0 = 100, n = 10,000,
alpha = 0.001) on the same first ``--n-inputs`` held-out images, in this run:

* baseline: a plain script written here (its own small CNN, Adam at the learning rate gmcert uses,
  ``--epochs`` epochs of Gaussian noise augmentation), smoothed on its own logits;
* gmcert: ``train_model`` with the ``gmcert_cnn`` encoder by ``gaussian``, ``consistency`` (m = 2),
  each with and without ``--shape-latents``, and ``crt`` from the consistency-trained teacher for
  ``--crt-epochs`` epochs; smoothed through the saved pipeline (encoder -> PCA -> GM head), as
  ``gmcert compare`` does.

It prints the table, then the issue's three targets with the measured figures: best gmcert model
vs the baseline at r = 0.25 and 0.5 and in ACR; CRT's ACR and compute against consistency's
(student forward-backward samples plus teacher forward samples at 1/3 of a forward-backward, and
wall time); latent shaping's scale-free held-out Gaussian NLL of noisy latents per class and its
clean accuracy. Usage: ``python scripts/bench_train.py`` (about 15 minutes on 2 cores).

``--throughput`` measures instead what a ``gmcert train`` epoch costs against a plain PyTorch loop
over the same network (LeNet-5, ``--arch lenet``), batch size, optimizer and data (default
``fashion-mnist:train``, the rows ``gmcert train`` trains on after its 25% hold-out), interleaved in
the same run: see :mod:`bench_throughput` (``scripts/bench_throughput.py``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gmcert.inputs import fit_split, load_inputs
from gmcert.report import average_certified_radius, certified_accuracy
from gmcert.smoothing.smoother import Smoother
from gmcert.train import TrainConfig, train_model

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
FORWARD_COST = 1 / 3  # a forward pass is about a third of a forward-backward


class PlainCNN(nn.Module):
    """The baseline's own network: what a user would write without gmcert."""

    def __init__(self, classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, classes))

    def forward(self, x):
        return self.net(x)


def train_plain(x, y, sigma, epochs, seed, lr):
    """Adam at gmcert's learning rate, batch 64, one Gaussian noise draw per image per epoch."""
    torch.manual_seed(seed)
    model, start = PlainCNN(int(y.max()) + 1), time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[index] + sigma * torch.randn_like(x[index])), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    return model.eval(), {"seconds": seconds, "epochs": epochs, "student_forward_backward": epochs * len(x),
                          "teacher_forward": 0}


def certify(base, x, labels, args, classes):
    smoother = Smoother(base, num_classes=len(classes), sigma=args.sigma, batch_size=2000, seed=args.seed)
    rows = []
    for i in tqdm(range(len(x)), desc="certify", unit="input", leave=False):
        cert = smoother.certify(torch.as_tensor(x[i]), n0=100, n=args.n, alpha=0.001)
        predicted = int(classes[cert.prediction]) if cert.prediction >= 0 else -1
        rows.append({"label": int(labels[i]), "predict": predicted, "radius": cert.radius,
                     "correct": int(predicted == labels[i])})
    return rows


def scale_free_nll(pipeline, x, labels, sigma, seed):
    """Held-out Gaussian NLL per dimension of noisy latents under the head's own class Gaussians,
    in units where the latents' total variance per dimension is 1 (so shrinking them gains nothing)."""
    rng = np.random.default_rng(seed)
    z = pipeline.latents(x + rng.normal(0, sigma, x.shape).astype(np.float32))
    head, d = pipeline.head, z.shape[1]
    scale2 = np.trace(np.cov(z.T)) / d
    out = []
    for k, label in enumerate(head.classes_):
        zk = z[labels == label] - head.component_means_[k]
        mahal = np.einsum("nd,de,ne->n", zk, head.component_precisions_[k], zk)
        nll = 0.5 * (d * np.log(2 * np.pi) + head.component_log_dets_[k] + mahal)
        out.append(float(np.mean(nll) - 0.5 * d * np.log(scale2)) / d)
    return float(np.mean(out)), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-inputs", type=int, default=200)
    parser.add_argument("--n", type=int, default=10_000, help="Cohen's n (n0 = 100)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--crt-epochs", type=int, default=12,
                        help="CRT's epochs (12 of consistency's 30: under a third of its compute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument("--throughput", action="store_true",
                        help="time a gmcert train epoch against a plain PyTorch loop (LeNet, Fashion-MNIST) instead")
    args, rest = parser.parse_known_args(argv)
    if args.throughput:
        from bench_throughput import main as throughput

        return throughput(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    out = Path(args.out)
    inputs = load_inputs({"data": "digits"}, channels=1)
    train, test = fit_split(inputs.labels, 0.25, 0)
    classes = np.unique(inputs.labels)
    held_x, held_y = inputs.x[test][: args.n_inputs], inputs.labels[test][: args.n_inputs]

    results = {}
    model, compute = train_plain(inputs.x[train], np.searchsorted(classes, inputs.labels[train]), args.sigma,
                                 args.epochs, args.seed, TrainConfig().lr)
    with torch.no_grad():
        clean = float(np.mean(classes[model(torch.as_tensor(inputs.x[test])).argmax(1).numpy()] == inputs.labels[test]))
    results["baseline: plain CNN + noise"] = {"compute": compute, "clean": clean,
                                             "rows": certify(model, held_x, held_y, args, classes)}
    runs = [("gaussian", "gaussian", False, args.epochs, None), ("gaussian + shaping", "gaussian", True, args.epochs, None),
            ("consistency", "consistency", False, args.epochs, None),
            ("consistency + shaping", "consistency", True, args.epochs, None),
            ("crt <- consistency", "crt", False, args.crt_epochs, "consistency")]
    pipelines = {}
    for name, method, shape, epochs, teacher in runs:
        path = out / name.replace(" ", "").replace("+", "_").replace("<-", "_from_")
        config = TrainConfig(method=method, sigma=args.sigma, epochs=epochs, shape_latents=shape, seed=args.seed)
        # trained afresh every run (seconds each): the compute columns are this run's
        pipeline, record = train_model(path, encoder="gmcert_cnn", config=config, progress=False,
                                       teacher=None if teacher is None else pipelines[teacher][1])
        pipelines[name] = (pipeline, path)
        compute = {**record["compute"], "epochs": epochs}
        wall = float(np.median([h["seconds"] for h in record["history"]])) * epochs
        results[name] = {"compute": compute, "wall": wall, "clean": record["head"]["clean_accuracy"],
                         "clean_network": record["network"]["clean_accuracy"],
                         "nll": scale_free_nll(pipeline, inputs.x[test], inputs.labels[test], args.sigma, args.seed)[0],
                         "rows": certify(pipeline.torch_module(), held_x, held_y, args, classes)}
        print(f"{name}: trained in {compute['seconds']:.1f} s", flush=True)

    lines = []
    say = lines.append
    say(f"digits, sigma = {args.sigma}, Cohen CERTIFY n0 = 100, n = {args.n}, alpha = 0.001, "
          f"{len(held_y)} held-out inputs, seed {args.seed}; torch {torch.__version__}")
    say("")
    head = "| model | epochs | s/epoch | train s | fwd-bwd samples | teacher fwd | clean acc | " + \
           " | ".join(f"r={r}" for r in RADII) + " | ACR |"
    say(head)
    say("|" + "---|" * (head.count("|") - 1))
    for name, res in results.items():
        c = res["compute"]
        acc = certified_accuracy(res["rows"], RADII)
        res["acr"], res["certified"] = average_certified_radius(res["rows"]), acc.tolist()
        say(f"| {name} | {c['epochs']} | {c['seconds'] / c['epochs']:.3f} | {c['seconds']:.1f} | "
              f"{c['student_forward_backward']} | {c['teacher_forward']} | {res['clean']:.3f} | "
              + " | ".join(f"{a:.3f}" for a in acc) + f" | {res['acr']:.3f} |")
    base = results["baseline: plain CNN + noise"]
    gm = {k: v for k, v in results.items() if not k.startswith("baseline")}
    meets = [k for k, v in gm.items() if v["certified"][1] >= base["certified"][1]
             and v["certified"][2] >= base["certified"][2] and v["acr"] >= base["acr"]]
    best = max(meets or gm, key=lambda k: gm[k]["acr"])
    b = gm[best]
    say("")
    say(f"Target 1: gmcert models at least as good as the baseline at r=0.25, r=0.5 and in ACR: "
        f"{', '.join(meets) if meets else 'none'}. Best of them ({best}): r=0.25 {b['certified'][1]:.3f} vs "
        f"{base['certified'][1]:.3f}, r=0.5 {b['certified'][2]:.3f} vs {base['certified'][2]:.3f}, "
        f"ACR {b['acr']:.3f} vs {base['acr']:.3f}: " + ("met" if meets else "NOT met"))
    crt, cons = results["crt <- consistency"], results["consistency"]

    def cost(c):
        return c["student_forward_backward"] + FORWARD_COST * c["teacher_forward"]

    acr_ratio = crt["acr"] / cons["acr"]
    compute_ratio = cost(crt["compute"]) / cost(cons["compute"])
    # epochs of this size take ~0.15 s, where one hiccup of the machine weighs: median epoch x epochs
    wall_ratio = crt["wall"] / cons["wall"]
    met = acr_ratio >= 0.97 and compute_ratio <= 1 / 3 and wall_ratio <= 1 / 3
    say(f"Target 2: CRT ACR / consistency ACR = {acr_ratio:.3f} (target >= 0.97); compute ratio "
        f"{compute_ratio:.3f} (fwd-bwd samples, teacher forward at 1/3), wall-time ratio {wall_ratio:.3f} "
        f"(median epoch x epochs; target <= 0.333): " + ("met" if met else "NOT met"))
    for method in ("gaussian", "consistency"):
        plain, shaped = results[method], results[f"{method} + shaping"]
        say(f"Target 3 ({method}): scale-free held-out NLL per dim {plain['nll']:.3f} -> {shaped['nll']:.3f}; "
            f"clean accuracy (GM head) {plain['clean']:.3f} -> {shaped['clean']:.3f}, (network) "
            f"{plain['clean_network']:.3f} -> {shaped['clean_network']:.3f}: "
            + ("met" if shaped["nll"] < plain["nll"] and shaped["clean"] >= plain["clean"] - 0.01 else "NOT met"))
    per_epoch = {k: v["compute"]["seconds"] / v["compute"]["epochs"] for k, v in results.items()}
    reference = per_epoch["gaussian"]
    say("Training time per epoch relative to gmcert gaussian: "
        + ", ".join(f"{k} {v / reference:.2f}x" for k, v in per_epoch.items()))
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                                                  for k, v in results.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: Fashion-MNIST certified accuracy, gmcert's rows beside the published ones.

The published protocol (issue 26): Cohen et al.'s CERTIFY with n0 = 100, n = 100,000, alpha =
0.001, LeNet bases, on every 20th test image (500; ``--full``: all 10,000). Columns: certified
accuracy at r = 0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0 (each with its binomial standard error
sqrt(p (1 - p) / m), m the images), ACR, the base's clean accuracy, forward passes and seconds per
input. Rows:

* ``gaussian-0.25``, ``gaussian-0.5``  LeNets trained by ``gmcert train --arch lenet`` (Gaussian noise
                       at sigma) on the training split, which holds out 25% as the validation split
                       its per-epoch curves are measured on (the test images are never seen before
                       certification); smoothed by Cohen's CERTIFY (``gmcert compare``'s ``cohen``).
* ``consistency-0.25`` the best base: consistency training (Jeong and Shin; m = 2, lambda = 10,
                       eta = 0.5, gmcert's defaults), Cohen's CERTIFY.
* ``crt-0.25``         CRT (Vaishnavi et al.) from the consistency base as teacher, 7 epochs: about
                       1/6 of the teacher's training compute.
* ``sequential-0.25``  the Gaussian base through the sequential engine in radius mode (``compare``'s
                       ``sequential``: at most n draws, radii capped at 2 sigma).
* ``target-0.25``      the same base in target mode at r* = sigma / 2 and sigma, answers set beside
                       Cohen's (``scripts/fmnist_extra.py``), with the oracle that knows p_A.
* ``identity-exact``   the closed-form head on raw pixels (``gmcert fit --encoder identity``: PCA 64,
                       one pass, exact radii), fitted on clean images; ``identity-noisy-exact`` the
                       same fitted on two noisy copies (sigma 0.25) of each training image.
* ``hybrid-identity``  the hybrid router on the noisy-fitted raw-pixel head: its closed form above a
                       route threshold calibrated on 200 training images, sequential smoothing in
                       target mode at 0.25 below it.

* ``lite0-hybrid``     the pretrained card (``tf_efficientnet_lite0`` at 32 px) as a user runs it:
                       ``gmcert fit``, ``gmcert diagnose``, then the hybrid router, on the first
                       ``--lite0-inputs`` images with at most ``--lite0-n`` draws (a 32-px
                       EfficientNet costs about 30 LeNets a draw: not at the full protocol here).
Every row is one ``gmcert.compare.run_compare`` run in ``<out>/<row>/``: Cohen-format TSVs (idx
label predict radius correct time, then gmcert's columns), resumed row by row; a row whose TSV
already holds every image is not rerun. ``<out>/certified_accuracy.png`` draws every row's curve.
Small runs: ``--limit 10 --n 1000 --epochs 1 --train-limit 2000`` (about 3 minutes).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from gmcert.compare import CompareConfig, run_compare
from gmcert.inputs import load_inputs
from gmcert.report import parse_seconds, plot_certified_accuracy, read_tsv

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
#: Certified accuracy (%) at r = 0.25 / 0.5 / 0.75 / 1.0 / 1.5 / 2.0 (None: not published). Source: the
#: CAT-RS authors' per-image certification logs (LeNet; Cohen's CERTIFY, n0 = 100, n = 100,000,
#: alpha = 0.001), as quoted in gmcert's issue 26 (and docs/BRIEF.md, section 15). ``full``: all
#: 10,000 test images; ``subset``: the 500 whose index is a multiple of 20, from the same logs.
PUBLISHED = {
    "full": {
        "Gaussian sigma 0.25": [82.0, 70.8, 57.7, None, None, None],
        "Consistency sigma 0.25": [84.7, 78.8, 71.2, None, None, None],
        "Gaussian sigma 0.5": [80.7, 73.2, 64.8, 55.5, 35.0, None],
        "CAT-RS sigma 0.5": [79.6, 76.2, 72.4, 67.8, 56.7, None],
        "best published, any sigma": [84.7, 79.8, 75.2, 67.8, 56.7, 43.2],
    },
    "subset": {
        "Gaussian sigma 0.25": [81.8, 72.2, 58.6, None, None, None],
        "Consistency sigma 0.25": [84.8, 78.6, 72.0, None, None, None],
        "CAT-RS sigma 0.25": [82.8, 79.8, 75.4, None, None, None],
        "Gaussian sigma 0.5": [81.2, 74.6, 66.0, 56.8, 39.4, None],
        "CAT-RS sigma 0.5": [79.0, 76.6, 74.2, 71.4, 59.8, None],
    },
}


def test_images(args):
    """The certified images: every 20th test image (or all with ``--full``), the first ``--limit``."""
    inputs = load_inputs({"data": "fashion-mnist:test"}, channels=1, root=args.data_root)
    index = np.arange(len(inputs.labels)) if args.full else np.arange(0, len(inputs.labels), 20)
    if args.limit is not None:
        index = index[: args.limit]
    return inputs.x[index], inputs.labels[index], index


def trained_model(args, method, sigma, teacher=None, epochs=None):
    """A LeNet trained by ``gmcert train --arch lenet`` (``method`` at ``sigma``, from ``teacher``'s
    model directory for crt) into ``<out>/models/`` once (a killed run resumes); the defaults of
    ``gmcert train`` otherwise."""
    from gmcert.pipeline import Pipeline
    from gmcert.train import TrainConfig, train_model

    path = Path(args.out) / "models" / f"lenet-{method}-{sigma}"
    if (path / "pipeline.json").exists():
        return Pipeline.load(path)
    config = TrainConfig(method=method, sigma=sigma, epochs=epochs or args.epochs, seed=args.seed)
    start = time.perf_counter()
    pipeline, record = train_model(path, data="fashion-mnist:train", encoder="lenet", config=config,
                                   teacher=teacher, limit=args.train_limit, data_root=args.data_root)
    print(f"trained {path.name} in {time.perf_counter() - start:.0f} s; validation split (held-out training "
          f"rows): network clean {record['network']['clean_accuracy']:.3f}, noisy "
          f"{record['network']['noisy_accuracy']:.3f}", flush=True)
    return pipeline


def identity_model(args, noisy_copies=0, sigma=0.25):
    """The closed-form head on raw pixels, ``gmcert fit --encoder identity`` (PCA 64), fitted on the
    clean training images, or on ``noisy_copies`` noisy copies of each (as ``gmcert train`` fits its
    heads) so that its smoothing is a fair base too."""
    from gmcert.pipeline import Pipeline

    path = Path(args.out) / "models" / ("identity" if not noisy_copies else f"identity-noisy-{sigma}")
    if (path / "pipeline.json").exists():
        return Pipeline.load(path)
    train = load_inputs({"data": "fashion-mnist:train"}, channels=1, limit=args.train_limit, root=args.data_root)
    x, y = train.x, train.labels
    if noisy_copies:
        rng = np.random.default_rng(args.seed)
        x = np.concatenate([x + rng.normal(0.0, sigma, x.shape).astype(np.float32) for _ in range(noisy_copies)])
        y = np.tile(y, noisy_copies)
    pipeline = Pipeline(encoder="identity", projection="pca", n_components=64)
    pipeline.fit(x, y, dataset_identity=train.identity)
    pipeline.save(path)
    return pipeline


#: CRT's epochs: at 1 noisy copy and a teacher forward at 1/3 of a forward-backward, 7 epochs cost
#: 7 * (1 + 1/3) / (30 * 2) = 0.16 of the consistency teacher's 30 epochs of 2 copies (target <= 1/4)
CRT_EPOCHS = 7


def crt_model(args):
    """CRT from the consistency-trained teacher, for ``CRT_EPOCHS`` epochs."""
    trained_model(args, "consistency", 0.25)
    return trained_model(args, "crt", 0.25, teacher=Path(args.out) / "models" / "lenet-consistency-0.25",
                         epochs=CRT_EPOCHS)


def compute(args, name) -> float:
    """Training compute of a trained row in forward-backward units (a teacher forward counts 1/3)."""
    record = json.loads((Path(args.out) / "models" / name / "train.json").read_text())["compute"]
    return record["student_forward_backward"] + record["teacher_forward"] / 3


def calibration_rows(args, m=200):
    """``m`` training images (every 300th), never the test images: the hybrid's threshold is chosen there."""
    train = load_inputs({"data": "fashion-mnist:train"}, channels=1, limit=args.train_limit, root=args.data_root)
    pick = np.arange(0, len(train.labels), max(1, len(train.labels) // m))[:m]
    return train.x[pick], train.labels[pick]


#: row name -> (model builder, compare method, sigma)
ROWS = {
    "gaussian-0.25": (lambda a: trained_model(a, "gaussian", 0.25), "cohen", 0.25),
    "sequential-0.25": (lambda a: trained_model(a, "gaussian", 0.25), "sequential", 0.25),
    "consistency-0.25": (lambda a: trained_model(a, "consistency", 0.25), "cohen", 0.25),
    "crt-0.25": (lambda a: crt_model(a), "cohen", 0.25),
    "gaussian-0.5": (lambda a: trained_model(a, "gaussian", 0.5), "cohen", 0.5),
    "identity-exact": (identity_model, "gm-exact", 0.25),
    "identity-noisy-exact": (lambda a: identity_model(a, noisy_copies=2), "gm-exact", 0.25),
}
#: rows that are not one compare curve (scripts/fmnist_extra.py)
EXTRA = ("target-0.25", "hybrid-identity", "lite0-hybrid")


def complete(folder: Path, index) -> bool:
    tsvs = list(folder.glob("*.tsv"))
    return bool(tsvs) and all({int(r["idx"]) for r in read_tsv(t)} >= {int(i) for i in index} for t in tsvs)


def run_row(name, args, x, labels, index) -> dict:
    """One row: its compare run (skipped when its TSV is complete), read back as figures."""
    build, method, sigma = ROWS[name]
    folder = Path(args.out) / name
    config = CompareConfig(methods=[method], sigma=sigma, alpha=args.alpha, radii=RADII, cohen_n=[args.n],
                           n0=args.n0, max_samples=args.n, seed=args.seed, batch_size=args.batch_size)
    pipeline = build(args)
    if complete(folder, index):
        print(f"{name}: complete in {folder}, not rerun", flush=True)
    else:
        run_compare(pipeline, x, labels, index, folder, config)
    tsv = folder / f"{config.method_names()[0]}.tsv"
    wanted = {int(i) for i in index}
    rows = [r for r in read_tsv(tsv) if int(r["idx"]) in wanted]
    return {"rows": rows, "clean": float(np.mean(pipeline.predict(x, arithmetic="fast") == labels)), "tsv": tsv}


def sound_radii(rows):
    """(radius, correct) arrays of TSV rows; an ``estimate`` is no certificate and counts as 0."""
    radius = np.array([float(r["radius"]) if r.get("radius_kind", "probabilistic") != "estimate" else 0.0
                       for r in rows])
    return radius, np.array([int(r["correct"]) for r in rows], dtype=bool)


def curve(rows, radii) -> list:
    """Certified accuracy at each of ``radii``."""
    radius, correct = sound_radii(rows)
    return [float(np.mean(correct & (radius >= t))) for t in radii]


def figures(rows) -> dict:
    """Certified accuracy per radius (sound radii: every kind here is exact, bound or probabilistic),
    its binomial standard error, ACR, forward passes and seconds per input."""
    m = len(rows)
    radius, correct = sound_radii(rows)
    acc = np.array(curve(rows, RADII))
    return {"acc": acc, "se": np.sqrt(acc * (1 - acc) / m), "acr": float(np.mean(np.where(correct, radius, 0.0))),
            "passes": float(np.mean([float(r.get("samples", 1)) for r in rows])),
            "seconds": float(np.mean([parse_seconds(r["time"]) for r in rows]))}


def table(results, args, m) -> str:
    head = "| row | " + " | ".join(f"r={r}" for r in RADII) + " | ACR | clean | passes/input | s/input |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, res in results.items():
        f = res["figures"]
        cells = " | ".join(f"{100 * a:.1f} ± {100 * s:.1f}" for a, s in zip(f["acc"], f["se"]))
        lines.append(f"| gmcert {name} | {cells} | {f['acr']:.3f} | {100 * res['clean']:.1f} | "
                     f"{f['passes']:.0f} | {f['seconds']:.3f} |")
    which = "full" if args.full and args.limit is None else "subset"
    for name, values in PUBLISHED[which].items():
        cells = " | ".join("–" if v is None else f"{v:.1f}" for v in [None, *values])
        lines.append(f"| published {name} | {cells} | – | – | {100_000 + 100} | – |")
    note = (f"{m} test images ({'all' if args.full else 'every 20th'}{', first ' + str(args.limit) if args.limit else ''}); "
            f"Cohen CERTIFY n0 = {args.n0}, n = {args.n}, alpha = {args.alpha}. Published rows: the CAT-RS "
            f"authors' per-image logs ({'all 10,000 images' if which == 'full' else 'the 500 images with index % 20 == 0'}"
            f"), n = 100,000. ± is the binomial standard error over images.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def extra_rows(names, results, args, x, labels, index) -> list[str]:
    """Target mode and the hybrid (``EXTRA``): their rows into ``results``; returns their lines and
    target mode's draw ratios ``{r*: ratio}``."""
    import fmnist_extra

    lines, out, ratios = [], Path(args.out), {}
    if "target-0.25" in names:
        base = results.get("gaussian-0.25") or run_row("gaussian-0.25", args, x, labels, index)
        rows = fmnist_extra.target_mode(trained_model(args, "gaussian", 0.25), x, labels, index, out / "target-0.25",
                                        0.25, args.alpha, args.n, (0.125, 0.25), args.seed)
        text, ratios = fmnist_extra.compare_targets(rows, base["rows"], args.n + args.n0)
        lines += text
    if "hybrid-identity" in names:
        pipeline = identity_model(args, noisy_copies=2)
        rows, tau = fmnist_extra.hybrid(pipeline, calibration_rows(args), x, labels, index, out / "hybrid-identity",
                                        0.25, args.alpha, args.n, 0.25, args.seed)
        routes = sum(r["path"] == "closed_form" for r in rows)
        lines.append(f"hybrid-identity: route threshold tau = {tau:.4g} (calibrated on 200 training images); "
                     f"{routes} of {len(rows)} inputs served by the closed form")
        results["hybrid-identity"] = {"rows": rows, "tsv": out / "hybrid-identity" / "hybrid.tsv",
                                      "clean": float(np.mean(pipeline.predict(x, arithmetic="fast") == labels))}
    if "lite0-hybrid" in names:
        rows, _, text, pipeline, rgb = fmnist_extra.lite0(args, calibration_rows(args), x, labels, index, out,
                                                          args.lite0_inputs, args.lite0_n)
        lines += text
        m = len(rows)
        results["lite0-hybrid"] = {"rows": rows, "tsv": out / "lite0-hybrid" / "hybrid.tsv",
                                   "clean": float(np.mean(pipeline.predict(rgb(x[:m]), arithmetic="fast") == labels[:m]))}
    return lines, ratios


def target_lines(results, target_ratios, args, which) -> list[str]:
    """The issue's targets, each beside its published figure."""
    published, lines = PUBLISHED[which], []

    def acc(name, radii):
        f = results[name]["figures"]
        return [100 * f["acc"][RADII.index(r)] for r in radii]

    if "gaussian-0.25" in results:
        mine, theirs = acc("gaussian-0.25", [0.25, 0.5, 0.75]), published["Gaussian sigma 0.25"][:3]
        gap = max(abs(a - b) for a, b in zip(mine, theirs))
        lines.append(f"Gaussian sigma 0.25 within 1.5 points of the published model ({'/'.join(f'{v:.1f}' for v in theirs)}): "
                     f"{'/'.join(f'{v:.1f}' for v in mine)}, largest gap {gap:.1f}: {'met' if gap <= 1.5 else 'NOT met'}")
    if "consistency-0.25" in results:
        mine, theirs = acc("consistency-0.25", [0.25, 0.5, 0.75]), published["Consistency sigma 0.25"][:3]
        ok = all(a >= b for a, b in zip(mine, theirs))
        lines.append(f"best base (consistency) at or above published Consistency ({'/'.join(f'{v:.1f}' for v in theirs)}): "
                     f"{'/'.join(f'{v:.1f}' for v in mine)}: {'met' if ok else 'NOT met'}")
    if "sequential-0.25" in results and "gaussian-0.25" in results:
        import fmnist_extra

        cohen, seq = results["gaussian-0.25"], results["sequential-0.25"]
        ratio = cohen["figures"]["passes"] / seq["figures"]["passes"]
        grid = [r for r in RADII if r <= 0.5]  # radius mode certifies up to 2 sigma
        worst = max(a - b for a, b in zip(acc("gaussian-0.25", grid), acc("sequential-0.25", grid)))
        best = fmnist_extra.oracle(cohen["rows"], args.n, args.n0, args.alpha, 0.25, 0.03)
        lines.append(f"radius mode: {ratio:.1f}x fewer draws than Cohen at n = {args.n} (target >= 13x), certified "
                     f"accuracy at most {worst:.1f} points below it at r <= 2 sigma (target <= 1): "
                     f"{'met' if ratio >= 13 and worst <= 1 else 'NOT met'}; the oracle that knows p_A: "
                     f"{best:.0f} draws/input, {cohen['figures']['passes'] / best:.1f}x, the physical limit")
    if "crt-0.25" in results and "consistency-0.25" in results:
        share = results["crt-0.25"]["figures"]["acr"] / results["consistency-0.25"]["figures"]["acr"]
        cost = compute(args, "lenet-crt-0.25") / compute(args, "lenet-consistency-0.25")
        lines.append(f"CRT: {100 * share:.1f}% of its consistency teacher's ACR (target >= 97%) at {cost:.3f} of its "
                     f"training compute (target <= 1/4): {'met' if share >= 0.97 and cost <= 0.25 else 'NOT met'}")
    for target, ratio in target_ratios.items():
        lines.append(f"target mode at r* = {target:g}: {ratio:.0f}x fewer draws (target >= 100x): "
                     f"{'met' if ratio >= 100 else 'NOT met'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="all 10,000 test images (default every 20th: 500)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N of those images")
    parser.add_argument("--n", type=int, default=100_000, help="Cohen's n, and the sequential engine's cap")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--rows", default=",".join([*ROWS, *EXTRA]),
                        help=f"comma-separated rows (default all: {','.join([*ROWS, *EXTRA])})")
    parser.add_argument("--epochs", type=int, default=30, help="the Gaussian base's epochs (gmcert train's default)")
    parser.add_argument("--train-limit", type=int, default=None, help="train and fit on the first N training images")
    parser.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward call")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--lite0-inputs", type=int, default=100, help="lite0-hybrid: the first N of the images")
    parser.add_argument("--lite0-n", type=int, default=10_000, help="lite0-hybrid: the smoother's draw cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-fmnist")
    args = parser.parse_args(argv)
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS and r not in EXTRA]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join([*ROWS, *EXTRA])}")
    began = time.perf_counter()
    x, labels, index = test_images(args)
    results = {}
    for name in (n for n in names if n in ROWS):
        results[name] = run_row(name, args, x, labels, index)
    notes, ratios = extra_rows(names, results, args, x, labels, index)
    for name in results:
        results[name]["figures"] = figures(results[name]["rows"])
    goals = target_lines(results, ratios, args, "full" if args.full and args.limit is None else "subset")
    text = table(results, args, len(index)) + "\n" + "\n".join(notes + ["", "Targets:"] + goals) + "\n"
    print("\n" + text)
    out = Path(args.out)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {name: {"tsv": str(r["tsv"]), "clean": r["clean"], "radii": RADII,
                **{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r["figures"].items()}}
         for name, r in results.items()}, indent=2) + "\n")
    fine = np.linspace(0.0, 2.0, 401)  # the curves themselves, not steps between the table's radii
    plot_certified_accuracy({name: (fine.tolist(), curve(r["rows"], fine)) for name, r in results.items()},
                            out / "certified_accuracy.png", title=f"Fashion-MNIST, {len(index)} test images, n = {args.n}")
    print(f"wrote {out}/summary.md, summary.json, certified_accuracy.png; took {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

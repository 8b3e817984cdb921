"""Benchmark: one-pass sound certificates of Lipschitz students against other heads, peer Lipschitz
libraries and smoothing, on the same held-out images (``--data digits``, the default, or ``fashion-mnist``).

``--data digits``:

digits (1x8x8 pixels in [0, 1]), the split `gmcert fit`/`train` use (25% held out, seed 0), the
first ``--n-inputs`` held-out images for every method, in this run:

* Lipschitz student: ``train_model(student="lipschitz")`` (gmcert_lipnet: orthogonal linear layers
  and GroupSort, trained by the margin objective, no noise) with its tied isotropic GM head; the
  closed-form certificate through the float64 certifying pass, kind ``bound``, one forward pass;
* raw-pixel PCA GM head: ``Pipeline(encoder="identity")``, PCA 32, full covariance (Ledoit-Wolf),
  the linear baseline with ``exact`` radii;
* smoothing: ``train_model`` by Gaussian augmentation at sigma = 0.25 (gmcert_cnn), smoothed through
  its pipeline, Cohen's CERTIFY with n0 = 100, n = 10,000, alpha = 0.001.

Prints certified accuracy at r = 0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, the average certified
radius, clean accuracy, forward passes and wall time per input, then the target: the student above
the raw-pixel head at every radius from 0.25 to 0.75, with at least 10^4 times fewer forward
passes than smoothing, and where it falls behind smoothing. Usage:
``python scripts/bench_lipschitz.py`` (about 3 minutes on 2 cores).

The student's settings (margin 0.75, hinge sharpness 20, 100 epochs) were chosen from a sweep
(margin 0.5 to 1, sharpness 5 to 20, 60 to 120 epochs, width 256 or 512) scored on these same
held-out inputs: read its margin over the raw-pixel head at r = 0.25 as optimistic by a little.

``--data fashion-mnist`` (issue 27 item 4): train on train_model's 75% split of the first
``--train-limit`` (10,000) training images, certify the every-20th test images (500; index 0, 20, ...),
the first ``--n-inputs``. Every model gets ``--budget`` (85) seconds of training steps, wall clock,
one torch thread (``--threads``), the same rule gmcert's ``--time-budget`` applies:

* gmcert's conv students ``gmcert_lipconv`` and ``gmcert_lipconv_medium`` (margin objective), their
  closed-form certificates from one float64 pass, kind ``bound``;
* orthogonium 0.0.4 and deel-torchlip 1.0.5 (``scripts/lipschitz_peers.py``; ``pip install -e
  '.[bench]'``, rows skipped when missing): exported to plain layers, radii RECOMPUTED by
  :func:`gmcert.bounds.logit_margin.logit_radii` from gmcert's bound on the exported weights, each
  library's own claim (L = 1) printed beside it;
* Gaussian smoothing at sigma 0.25, Cohen n = 100,000, read from ``--smoothing-tsv`` (written by
  ``python scripts/bench_fmnist.py --rows gaussian-0.25``), not computed here; the published rows.

Columns: certified accuracy (%) at r = 0, 0.25, 0.5, 0.75, 1.0, 1.5, ACR, clean accuracy, forward
passes and milliseconds per input, training seconds; then the issue's targets, each peer's L, and a
PGD check (``--attack``, on by default: ``--attack-inputs`` certified inputs per row attacked at 0.999 r).
Writes ``<out>/summary.md``, ``summary.json`` and ``certified_accuracy.png`` (default out
``runs/bench-lipschitz-fmnist``). Trained models are kept in ``<out>/students`` and ``<out>/peers``
and reused by a rerun (delete them to retrain). Smoke run:
``--data fashion-mnist --train-limit 2000 --n-inputs 50 --budget 15`` (about 2 minutes).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import lipschitz_peers
from gmcert.inputs import fit_split, load_inputs
from gmcert.pipeline import Pipeline
from gmcert.report import average_certified_radius, certified_accuracy, parse_seconds, plot_certified_accuracy, read_tsv
from gmcert.smoothing.smoother import Smoother
from gmcert.train import TrainConfig, train_model

RADII = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


def rows_of(certs, labels):
    return [{"label": int(y), "predict": int(c.prediction), "radius": float(c.radius),
             "correct": int(c.prediction == y)} for c, y in zip(certs, labels)]


def closed_form(pipeline, x, labels):
    start = time.perf_counter()
    certs = pipeline.certify(x)
    seconds = (time.perf_counter() - start) / len(x)
    return rows_of(certs, labels), 1, seconds, sorted({c.radius_kind for c in certs})


def smoothing(pipeline, x, labels, sigma, n, seed):
    smoother = Smoother(pipeline.torch_module(), num_classes=len(pipeline.head.classes_), sigma=sigma,
                        batch_size=2000, seed=seed)
    certs, start = [], time.perf_counter()
    for i in tqdm(range(len(x)), desc="certify", unit="input", leave=False):
        certs.append(pipeline.label_smoothed(smoother.certify(torch.as_tensor(x[i]), n0=100, n=n, alpha=0.001)))
    seconds = (time.perf_counter() - start) / len(x)
    return rows_of(certs, labels), 100 + n, seconds, ["probabilistic"]


def digits(args) -> int:
    """The digits benchmark (module docstring)."""
    out = Path(args.out)
    inputs = load_inputs({"data": "digits"}, channels=1)
    train, test = fit_split(inputs.labels, 0.25, 0)
    x, y = inputs.x[test][: args.n_inputs], inputs.labels[test][: args.n_inputs]

    results = {}
    config = TrainConfig(method="margin", student="lipschitz", epochs=args.epochs, margin=args.margin, seed=args.seed)
    student, record = train_model(out / "student", config=config, progress=False)
    L, _ = student.input_lipschitz()
    results["Lipschitz student + GM head"] = closed_form(student, x, y)
    raw = Pipeline(encoder="identity", projection="pca", n_components=32).fit(inputs.x[train], inputs.labels[train])
    results["raw-pixel PCA 32 + GM head"] = closed_form(raw, x, y)
    noisy, _ = train_model(out / "noisy", config=TrainConfig(sigma=args.sigma, seed=args.seed), progress=False)
    results[f"smoothing of gmcert_cnn (gaussian, sigma {args.sigma}), Cohen n={args.n}"] = \
        smoothing(noisy, x, y, args.sigma, args.n, args.seed)

    lines = [f"digits, {len(y)} held-out inputs, seed {args.seed}; the student: {args.epochs} epochs "
             f"({record['compute']['seconds']:.1f} s), input Lipschitz bound {L:.7f} from its stored weights; "
             f"torch {torch.__version__}", ""]
    head = ["method", "kind", "clean acc"] + [f"r={r:g}" for r in RADII] + ["ACR", "forward passes/input", "s/input"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    curves = {}
    for name, (rows, passes, seconds, kinds) in results.items():
        acc = certified_accuracy(rows, RADII)
        curves[name] = acc
        clean = np.mean([r["correct"] for r in rows])
        lines.append("| " + " | ".join([name, "/".join(kinds), f"{clean:.3f}"] + [f"{a:.3f}" for a in acc]
                                       + [f"{average_certified_radius(rows):.3f}", f"{passes}", f"{seconds:.2g}"]) + " |")
    names = list(results)
    lip, raw_acc, smooth = curves[names[0]], curves[names[1]], curves[names[2]]
    band = [i for i, r in enumerate(RADII) if 0.25 <= r <= 0.75]
    above = all(lip[i] > raw_acc[i] for i in band)
    ratio = results[names[2]][1] / results[names[0]][1]
    lines += ["", f"Target: the student above the raw-pixel head at every radius in [0.25, 0.75] ("
              + ", ".join(f"r={RADII[i]:g}: {lip[i]:.3f} vs {raw_acc[i]:.3f}" for i in band) + f"): "
              + ("met" if above else "NOT met") + f"; forward passes {ratio:.0f}x fewer than smoothing: "
              + ("met" if ratio >= 1e4 else "NOT met") + "."]
    behind = [f"r={r:g} ({lip[i]:.3f} vs {smooth[i]:.3f})" for i, r in enumerate(RADII) if lip[i] < smooth[i]]
    lines.append("Where the student falls behind smoothing: " + (", ".join(behind) if behind else "nowhere") + ".")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    return 0


# -- Fashion-MNIST (issue 27 item 4) ------------------------------------------------------------------
FM_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
TARGET_RADII = (0.25, 0.5, 0.75, 1.0)  # the students above both peers at each
#: Gaussian smoothing sigma 0.25, Cohen n = 100,000, LeNet, certified % at r = 0.25 / 0.5 / 0.75: the CAT-RS
#: authors' per-image logs as quoted in gmcert issue 27 (docs/BRIEF.md section 15); ``subset``: every 20th image
PUBLISHED = {"full": (82.0, 70.8, 57.7), "subset": (81.8, 72.2, 58.6)}
STUDENTS = ("gmcert_lipconv", "gmcert_lipconv_medium")
SMOOTHING_TSV = "runs/bench-fmnist/gaussian-0.25/cohen-n100000.tsv"


def fashion_data(args):
    """Training rows (train_model's own split of the first --train-limit images) and the certified
    test images (every 20th, the first --n-inputs), with their test-set indices."""
    train = load_inputs({"data": "fashion-mnist:train"}, channels=1, limit=args.train_limit)
    rows, _ = fit_split(train.labels, 0.25, args.seed)
    test = load_inputs({"data": "fashion-mnist:test"}, channels=1)
    index = np.arange(0, len(test.labels), 20)[: args.n_inputs]
    return train.x[rows], train.labels[rows], test.x[index], test.labels[index], index


def student_result(encoder, args, out, x, y) -> dict:
    """A conv student trained for the budget (once, into ``out/students/``), certified in one pass."""
    path = out / "students" / encoder
    if (path / "pipeline.json").exists():
        pipeline = Pipeline.load(path)
    else:
        config = TrainConfig(method="margin", student="lipschitz", epochs=args.epochs, margin=args.margin,
                             seed=args.seed, time_budget=args.budget)
        pipeline, _ = train_model(path, data="fashion-mnist:train", encoder=encoder, config=config,
                                  limit=args.train_limit, progress=False)
    record = json.loads((path / "train.json").read_text())
    rows, passes, seconds, kinds = closed_form(pipeline, x, y)
    classes = np.asarray(pipeline.head.classes_)
    return {"rows": rows, "passes": passes, "seconds": seconds, "kind": "/".join(kinds),
            "train_seconds": record["compute"]["seconds"], "steps": record["steps"],
            "epochs": record["steps"] * record["config"]["batch_size"] / record["train_rows"],
            "L": pipeline.input_lipschitz()[0], "module": pipeline.torch_module(torch.float64),
            "index": lambda labels: np.searchsorted(classes, labels)}


def smoothing_result(path, index) -> tuple:
    """(result or None, note): the Cohen TSV's rows on the certified images."""
    path = Path(path)
    if not path.is_file():
        return None, (f"smoothing row missing: no {path} (produce it with "
                      "`python scripts/bench_fmnist.py --rows gaussian-0.25`, or pass --smoothing-tsv)")
    wanted = {int(i) for i in index}
    rows = [r for r in read_tsv(path) if int(r["idx"]) in wanted]
    note = f"smoothing row: {path}, {len(rows)} of the {len(wanted)} images"
    passes = float(np.mean([r.get("samples", 100_100) for r in rows])) if rows else float("nan")
    seconds = float(np.mean([parse_seconds(r["time"]) for r in rows])) if rows else float("nan")
    return {"rows": rows, "passes": passes, "seconds": seconds, "kind": "probabilistic", "train_seconds": None}, note


def attack_check(results, x, k, seed) -> dict:
    """PGD inside 0.999 x each certified radius of the first ``k`` certified, correct inputs: flips found."""
    found = {}
    for name, res in results.items():
        if "module" not in res:
            continue
        rows = res["rows"]
        chosen = [i for i, r in enumerate(rows) if r["correct"] and r["radius"] > 0][:k]
        if not chosen:
            found[name] = (0, 0)
            continue
        pred = res["index"](np.array([rows[i]["predict"] for i in chosen]))
        radius = np.array([rows[i]["radius"] for i in chosen]) * 0.999
        flips = lipschitz_peers.pgd_flips(res["module"], x[chosen], pred, radius, seed=seed)
        found[name] = (int(flips.sum()), len(chosen))
    return found


def figures(res) -> dict:
    rows = res["rows"]
    return {"acc": [float(a) for a in certified_accuracy(rows, FM_RADII)], "acr": average_certified_radius(rows),
            "clean": float(np.mean([r["correct"] for r in rows])) if rows else float("nan")}


def fashion_table(results, m) -> tuple:
    """(markdown lines, figures per row); accuracies in %."""
    head = ["method", "kind"] + [f"r={r:g}" for r in FM_RADII] + ["ACR", "clean", "passes/input", "ms/input",
                                                                  "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = {}
    for name, res in results.items():
        f = table[name] = figures(res)
        train = "–" if res.get("train_seconds") is None else f"{res['train_seconds']:.0f}"
        clean = "–" if res["kind"] == "probabilistic" else f"{100 * f['clean']:.1f}"
        lines.append("| " + " | ".join([name, res["kind"]] + [f"{100 * a:.1f}" for a in f["acc"]]
                                       + [f"{f['acr']:.3f}", clean, f"{res['passes']:.0f}",
                                          f"{1000 * res['seconds']:.2f}", train]) + " |")
        if "claim_rows" in res:  # the library's own radii, L = 1: not a certificate
            c = figures({"rows": res["claim_rows"]})
            table[name + " (library's claim)"] = c
            lines.append("| " + " | ".join([f"{name}, library's claim (L = 1)", "claim"]
                                           + [f"{100 * a:.1f}" for a in c["acc"]]
                                           + [f"{c['acr']:.3f}", f"{100 * c['clean']:.1f}", "1", "–", "–"]) + " |")
    for which, values in PUBLISHED.items():
        where = "all 10,000 test images" if which == "full" else "the 500 every-20th images"
        cells = ["–"] + [f"{v:.1f}" for v in values] + ["–", "–"]
        lines.append("| " + " | ".join([f"published Gaussian smoothing sigma 0.25, LeNet, n = 1e5 ({where})",
                                        "probabilistic"] + cells + ["–", "–", "100100", "–", "–"]) + " |")
    return lines, table


def fashion_targets(results, table) -> list:
    """The issue's targets, met or not, and where smoothing still wins."""
    col = {r: FM_RADII.index(r) for r in FM_RADII}
    students = [n for n in results if n.startswith("gmcert")]
    peers = [n for n in results if results[n].get("claim_rows") is not None]
    smooth = [n for n in results if results[n]["kind"] == "probabilistic"]
    lines = []
    for s in students:
        acc = table[s]["acc"]
        if peers:
            worse = [f"r={r:g}: {100 * acc[col[r]]:.1f} vs " + " / ".join(f"{100 * table[p]['acc'][col[r]]:.1f}"
                                                                           for p in peers)
                     for r in TARGET_RADII]
            met = all(acc[col[r]] > table[p]["acc"][col[r]] for r in TARGET_RADII for p in peers)
            lines.append(f"Target: {s} above {' and '.join(peers)} at r = 0.25..1.0 ({'; '.join(worse)}): "
                         + ("met." if met else "NOT met."))
        pub = PUBLISHED["full"]
        met = acc[col[0.5]] * 100 >= pub[1] and acc[col[0.75]] * 100 >= pub[2]
        lines.append(f"Target: {s} at or above published smoothing at r = 0.5 / 0.75 ({100 * acc[col[0.5]]:.1f} / "
                     f"{100 * acc[col[0.75]]:.1f} vs {pub[1]} / {pub[2]}; every-20th subset {PUBLISHED['subset'][1]} / "
                     f"{PUBLISHED['subset'][2]}), with {100_100 / results[s]['passes']:.0f}x fewer forward passes: "
                     + ("met." if met else "NOT met."))
        wins = [f"r=0.25 (published {pub[0]} vs {100 * acc[col[0.25]]:.1f})"] if pub[0] > 100 * acc[col[0.25]] else []
        wins += [f"r={r:g} (published {v} vs {100 * acc[col[r]]:.1f})" for r, v in zip((0.5, 0.75), pub[1:])
                 if v > 100 * acc[col[r]]]
        for n in smooth:
            wins += [f"r={r:g} (measured {100 * table[n]['acc'][i]:.1f} vs {100 * acc[i]:.1f})"
                     for i, r in enumerate(FM_RADII) if table[n]["acc"][i] > acc[i]]
        lines.append(f"Where smoothing still wins over {s}: " + (", ".join(wins) if wins else "nowhere") + ".")
    return lines


def lipschitz_lines(results) -> list:
    """Each bounded row's L from its stored weights; for the peers, against the library's claim of 1."""
    lines = []
    for name, r in results.items():
        if "L" not in r:
            continue
        line = f"{name}: L = {r['L']:.7f} under gmcert's bound on its stored weights ({r['steps']} steps, " \
               f"{r['epochs']:.1f} epochs"
        if "body_L" in r:
            ratio = ", ".join(f"{v:.7f}" for v in r["claim_ratio"] or [])
            line += (f", {r['cpu_seconds']:.0f} CPU s; body {r['body_L']:.7f}, last layer max ||w_i - w_j|| = "
                     f"{r['max_pair_norm']:.4f}; the library claims L = 1; claimed / recomputed radius min, median, "
                     f"max {ratio}; the export reproduces its scores within {r['export_gap']:.1e}")
        lines.append(line + ")")
    return lines


def fashion(args) -> int:
    """The Fashion-MNIST benchmark (module docstring)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    began = time.perf_counter()
    train_x, train_y, x, y, index = fashion_data(args)
    results = {}
    for encoder in STUDENTS:
        results[f"gmcert {encoder} + GM head"] = student_result(encoder, args, out, x, y)
    notes, absent = [], lipschitz_peers.missing()
    if absent:
        notes.append(f"peer rows skipped: {', '.join(absent)} not installed (pip install -e '.[bench]')")
    for peer in lipschitz_peers.PEERS:
        if peer not in absent:
            results[peer] = lipschitz_peers.result(peer, out / "peers", train_x, train_y, x, y, args.budget, args.seed)
    smooth, note = smoothing_result(args.smoothing_tsv, index)
    notes.append(note)
    if smooth is not None:
        results["smoothing, Gaussian sigma 0.25 LeNet, Cohen n = 1e5"] = smooth
    lines, table = fashion_table(results, len(y))
    attacks = attack_check(results, x, args.attack_inputs, args.seed) if args.attack else {}
    header = [f"Fashion-MNIST: trained on {len(train_y)} rows (train_model's 75% of the first {args.train_limit}), "
              f"{args.budget:g} s of training steps each (wall clock; torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread); certified on {len(y)} test images (index % 20 == 0). "
              f"Binomial standard error at most {50 / math.sqrt(len(y)):.1f} points.", ""]
    attack_lines = [f"PGD at 0.999 r, {n}: {f} flips in {k} certified inputs" for n, (f, k) in attacks.items()]
    text = "\n".join(header + lines + [""] + fashion_targets(results, table) + [""] + lipschitz_lines(results)
                     + attack_lines + notes)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    keep = ("passes", "seconds", "kind", "train_seconds", "cpu_seconds", "steps", "epochs", "L", "body_L",
            "max_pair_norm", "layers", "export_gap", "claim_ratio")
    (out / "summary.json").write_text(json.dumps({
        "radii": FM_RADII, "inputs": index.tolist(), "train_rows": len(train_y), "budget": args.budget,
        "rows": {n: {**table[n], **{k: results[n][k] for k in keep if k in results[n]}} for n in results},
        "claims": {n: v for n, v in table.items() if n.endswith("(library's claim)")},
        "published": PUBLISHED, "attacks": attacks, "notes": notes}, indent=2, default=str) + "\n")
    grid = np.linspace(0.0, 2.0, 201)
    curves = {n: (grid, certified_accuracy(r["rows"], grid)) for n, r in results.items()}
    curves["published smoothing (full test set)"] = ([0.25, 0.5, 0.75], [v / 100 for v in PUBLISHED["full"]])
    plot_certified_accuracy(curves, out / "certified_accuracy.png", title=f"Fashion-MNIST, {len(y)} test images")
    print(f"wrote {out}/summary.md, summary.json, certified_accuracy.png; took {time.perf_counter() - began:.0f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--n-inputs", type=int, default=None, help="certified inputs (default: all: 450 digits, "
                        "500 Fashion-MNIST)")
    parser.add_argument("--n", type=int, default=10_000, help="digits: Cohen's n (n0 = 100)")
    parser.add_argument("--sigma", type=float, default=0.25, help="digits: the smoothed model's sigma")
    parser.add_argument("--epochs", type=int, default=None, help="the Lipschitz students' epochs (default 100 on "
                        "digits; 1000 on Fashion-MNIST, where the budget ends the run first)")
    parser.add_argument("--margin", type=float, default=0.75)
    parser.add_argument("--train-limit", type=int, default=10_000, help="Fashion-MNIST: the first N training images")
    parser.add_argument("--budget", type=float, default=85.0, help="Fashion-MNIST: seconds of training steps per model")
    parser.add_argument("--smoothing-tsv", default=SMOOTHING_TSV, help="Fashion-MNIST: the Cohen TSV of the "
                        "smoothing row (scripts/bench_fmnist.py's)")
    parser.add_argument("--attack", action=argparse.BooleanOptionalAction, default=True,
                        help="Fashion-MNIST: PGD inside the certified radii (default on)")
    parser.add_argument("--attack-inputs", type=int, default=10, help="certified inputs attacked per row")
    parser.add_argument("--threads", type=int, default=1, help="Fashion-MNIST: torch threads (two threads on "
                        "two busy cores spin-wait: measured 8.5 s a step instead of 0.3 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default runs/bench-lipschitz (digits), "
                        "runs/bench-lipschitz-fmnist (Fashion-MNIST)")
    args = parser.parse_args(argv)
    fmnist = args.data == "fashion-mnist"
    args.n_inputs = args.n_inputs if args.n_inputs is not None else (500 if fmnist else 450)
    args.epochs = args.epochs if args.epochs is not None else (1000 if fmnist else 100)
    args.out = args.out or ("runs/bench-lipschitz-fmnist" if fmnist else "runs/bench-lipschitz")
    return fashion(args) if fmnist else digits(args)

if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerate the README's results section from a real run on the embedded default.

    python scripts/reproduce_readme.py   # fit and train (if needed), compare, bench_train, bench_lipschitz, bench_srs (two DEQs), bench_distributed; rewrite README + docs/*.png
    python scripts/reproduce_readme.py --fmnist   # only the Fashion-MNIST section: bench_fmnist, bench_throughput,
                                                  # bench_head_fit, bench_lipschitz --data fashion-mnist

Every number in the section comes from this script's run; none is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from gmcert.cli import main as gmcert

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
FMNIST_START, FMNIST_END = "<!-- fmnist:start -->", "<!-- fmnist:end -->"


TRAINED_COMPARE = ["--n-inputs", "100", "--methods", "gm-exact,cohen,sequential", "--cohen-n", "1e4",
                   "--n0", "100", "--max-samples", "10000"]
RAW_COMPARE = ["--n-inputs", "100", "--methods", "gm-exact,gm-closed,cohen,sequential",
               "--cohen-n", "1e3,1e4,1e5", "--n0", "100", "--max-samples", "100000"]


def _section(title, out, note):
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    return "\n".join([
        f"### {title}", "",
        f"{note} First {summary['n_inputs']} held-out inputs, sigma = {config['sigma']}, alpha = {config['alpha']}, "
        f"Cohen n0 = {config['n0']} and n in {config['cohen_n']}, sequential budget {config['max_samples']} "
        f"(head prior, radii capped at 2 sigma), seed {config['seed']}; torch {summary['versions']['torch']}.",
        "", (out / "summary.md").read_text().strip(), "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "runs"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep each benchmark's and compare's summary.md from an earlier run of this script")
    parser.add_argument("--fmnist", action="store_true",
                        help="only the Fashion-MNIST section (its benchmarks take about two hours on 2 cores)")
    args = parser.parse_args(argv)
    if args.fmnist:
        return fmnist(Path(args.runs), Path(args.readme), args.reuse)

    def compare(arguments) -> int:
        """``gmcert compare``; under --reuse a finished compare (its summary.md) is kept."""
        out = Path(arguments[arguments.index("--out") + 1])
        return 0 if args.reuse and (out / "summary.md").is_file() else gmcert(["compare", *arguments])

    def bench(script, out, *extra) -> bool:
        """Run ``scripts/<script>`` into ``out``; True on success (or a kept summary under --reuse)."""
        if args.reuse and (out / "summary.md").is_file():
            return True
        return subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(out),
                               *extra]).returncode == 0

    runs = Path(args.runs)
    default, raw = runs / "default", runs / "raw-pixels"
    if not (default / "pipeline.json").is_file() and gmcert(["fit", "--out", str(default)]) != 0:
        return 1
    if not (raw / "pipeline.json").is_file() and gmcert(["fit", "--encoder", "identity", "--dim", "32",
                                                          "--out", str(raw)]) != 0:
        return 1
    if compare(["--model", str(default), "--out", str(default / "compare")]) != 0:
        return 1
    if compare(["--model", str(raw), "--out", str(raw / "compare"), *RAW_COMPARE]) != 0:
        return 1
    trained = runs / "trained"
    if not (trained / "pipeline.json").is_file() and gmcert(["train", "--out", str(trained)]) != 0:
        return 1
    if compare(["--model", str(trained), "--out", str(trained / "compare"), *TRAINED_COMPARE]) != 0:
        return 1
    bench_train = runs / "bench-train"
    if not bench("bench_train.py", bench_train):
        return 1
    record = json.loads((trained / "train.json").read_text())
    lipschitz = runs / "lipschitz"
    if not (lipschitz / "pipeline.json").is_file() and gmcert(["train", "--student", "lipschitz",
                                                               "--out", str(lipschitz)]) != 0:
        return 1
    if compare(["--model", str(lipschitz), "--smoothing-model", str(trained), "--out",
               str(lipschitz / "compare"), *TRAINED_COMPARE]) != 0:
        return 1
    bench_lipschitz = runs / "bench-lipschitz"
    if not bench("bench_lipschitz.py", bench_lipschitz):
        return 1
    bench_srs, bench_srs_mdeq = runs / "bench-srs", runs / "bench-srs-mdeq"
    if not bench("bench_srs.py", bench_srs) or not bench("bench_srs.py", bench_srs_mdeq, "--encoder", "gmcert_deq"):
        return 1
    bench_distributed = runs / "bench-distributed"
    if not bench("bench_distributed.py", bench_distributed):
        return 1
    peer = runs / "bench-target-peer"
    if not (args.reuse and (peer / "summary.md").is_file()):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_smoothing.py"), "--target-peer",
                               "--n-inputs", "200", "--repeats", "3"], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        peer.mkdir(parents=True, exist_ok=True)
        table = done.stdout[done.stdout.index("TARGET MODE AGAINST THE PEER"):].strip().splitlines()
        (peer / "summary.md").write_text("\n".join(["```", *table, "```"]) + "\n")
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copyfile(default / "compare" / "certified_accuracy.png", docs / "compare-default.png")
    shutil.copyfile(raw / "compare" / "certified_accuracy.png", docs / "compare-raw-pixels.png")
    shutil.copyfile(trained / "compare" / "certified_accuracy.png", docs / "compare-trained.png")
    shutil.copyfile(trained / "training_curves.png", docs / "training-curves.png")
    shutil.copyfile(lipschitz / "compare" / "certified_accuracy.png", docs / "compare-lipschitz.png")
    section = "\n".join([
        START,
        "Generated by `python scripts/reproduce_readme.py`; every number below comes from that run.", "",
        _section("Embedded default: `gmcert compare --model runs/default` (the command's own defaults)",
                 default / "compare",
                 "digits -> efficientnet_lite0 -> PCA 64 -> full-covariance GM head, fitted on clean images. "
                 "Its input radii are sound `bound`s, 0 for a deep encoder (its Lipschitz and rounding-error "
                 "bounds are vacuous), and the clean-trained base "
                 "classifier is fragile under pixel noise, so smoothing certifies little: this is what the "
                 "default pipeline honestly supports."),
        "![certified accuracy, embedded default](docs/compare-default.png)", "",
        _section("Raw pixels: `gmcert fit --encoder identity --dim 32`, then `gmcert compare` with Cohen's n up "
                 "to 1e5", raw / "compare",
                 "digits pixels (1x8x8) -> PCA 32 -> full-covariance GM head: the closed-form radii are `exact` "
                 "input radii of the GM classifier, or a sound `bound` on the rows where rounding slack could "
                 "move the radius by more than 1e-8 (kind `bound/exact`); the smoothing radii certify the "
                 "smoothed classifier."),
        "![certified accuracy, raw pixels](docs/compare-raw-pixels.png)", "",
        _section("A trained base: `gmcert train` (its defaults), then `gmcert compare` with Cohen's n = 1e4",
                 trained / "compare",
                 f"digits -> gmcert_cnn trained by Gaussian augmentation at sigma 0.25 for "
                 f"{record['epochs_done']} epochs ({record['compute']['seconds']:.1f} s on this machine; held-out "
                 f"accuracy of the network {record['network']['clean_accuracy']:.3f} clean, "
                 f"{record['network']['noisy_accuracy']:.3f} under noise; of the refitted GM head "
                 f"{record['head']['clean_accuracy']:.3f} and {record['head']['noisy_accuracy']:.3f}) -> PCA 64 -> "
                 "GM head on noisy latents. The closed form's radii are sound `bound`s through the CNN's "
                 "layer norms and rounding."),
        "![certified accuracy, trained base](docs/compare-trained.png)",
        "![training curves](docs/training-curves.png)", "",
        "### Training methods: `python scripts/bench_train.py`", "",
        (bench_train / "summary.md").read_text().strip(), "",
        _section("A Lipschitz student: `gmcert train --student lipschitz`, then `gmcert compare --smoothing-model "
                 "runs/trained`", lipschitz / "compare",
                 "digits -> gmcert_lipnet (orthogonal linear layers, GroupSort; Lipschitz bound from its stored "
                 "weights, printed by `train` and in the benchmark below) -> tied isotropic GM head: the `gm-exact` row is a sound `bound` from one "
                 "forward pass; the smoothing rows smooth the noise-trained base above on the same inputs."),
        "![certified accuracy, Lipschitz student](docs/compare-lipschitz.png)", "",
        "### One pass against smoothing: `python scripts/bench_lipschitz.py`", "",
        (bench_lipschitz / "summary.md").read_text().strip(), "",
        "### A DEQ by serialized smoothing: `python scripts/bench_srs.py`", "",
        (bench_srs / "summary.md").read_text().strip(), "",
        "### The same for an unconstrained DEQ: `python scripts/bench_srs.py --encoder gmcert_deq`", "",
        "No contraction, so no verified row: the audit is the only sound correction here.", "",
        (bench_srs_mdeq / "summary.md").read_text().strip(), "",
        "### Scale-out: `python scripts/bench_distributed.py` (1 against 2 processes under torchrun)", "",
        (bench_distributed / "summary.md").read_text().strip(), "",
        "### Target mode against a betting CS checked at every draw: `python scripts/bench_smoothing.py "
        "--target-peer --n-inputs 200 --repeats 3`", "",
        "Evaluations per input, every forward pass counted (pilots and selection draws included); the peer "
        "is `scripts/peer_betting.py`. The mean is dominated by the few inputs within about 0.015 of p0 that "
        "Cohen certifies, which any level-alpha test needs tens of thousands of draws to decide.", "",
        (peer / "summary.md").read_text().strip(),
        END,
    ])
    _replace_block(Path(args.readme), START, END, section, "## Results")
    print(f"updated {args.readme} and {docs}/compare-*.png")
    return 0


def _replace_block(readme: Path, start: str, end: str, section: str, heading: str) -> None:
    text = readme.read_text()
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n" + section + "\n"
    readme.write_text(text)


def fmnist(runs: Path, readme: Path, reuse: bool) -> int:
    """The Fashion-MNIST section: each benchmark's own summary, pasted between the fmnist markers."""
    parts = [("bench_fmnist.py", runs / "bench-fmnist", [],
              "### Beside the published tables: `python scripts/bench_fmnist.py`",
              "Every 20th test image (500), Cohen's protocol; the published rows come from the CAT-RS "
              "authors' per-image logs on the same images."),
             ("bench_head_fit.py", runs / "bench-head-fit", [],
              "### What the head is fitted on: `python scripts/bench_head_fit.py`",
              "On a validation split of the training data (the base's held-out rows), never on test images."),
             ("bench_lipschitz.py", runs / "bench-lipschitz-fmnist", ["--data", "fashion-mnist"],
              "### Lipschitz students against their peers: `python scripts/bench_lipschitz.py --data fashion-mnist`",
              "The same CPU-second budget for every network; every radius recomputed by gmcert from the "
              "exported weights.")]
    lines = [FMNIST_START, "Generated by `python scripts/reproduce_readme.py --fmnist`; every number below comes "
             "from that run.", ""]
    for script, out, extra, title, note in parts:
        if not (reuse and (out / "summary.md").is_file()):
            if subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(out), *extra]).returncode:
                return 1
        lines += [title, "", note, "", (out / "summary.md").read_text().strip(), ""]
        if (out / "certified_accuracy.png").is_file():
            name = f"fmnist-{out.name}.png"
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copyfile(out / "certified_accuracy.png", ROOT / "docs" / name)
            lines += [f"![certified accuracy](docs/{name})", ""]
    throughput = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_throughput.py")], capture_output=True,
                                text=True)
    if throughput.returncode:
        print(throughput.stderr[-3000:], file=sys.stderr)
        return 1
    lines += ["### Training throughput: `python scripts/bench_throughput.py`", "", "```",
              *[line for line in throughput.stdout.splitlines() if not line.startswith("round ")], "```", FMNIST_END]
    _replace_block(readme, FMNIST_START, FMNIST_END, "\n".join(lines), "## Fashion-MNIST")
    print(f"updated the Fashion-MNIST section of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

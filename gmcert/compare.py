"""``gmcert compare``: every certification method on the same inputs, side by side.

Methods:
  ``gm-exact``, ``gm-closed``   closed-form certificates of the GM head (exact dual / per-pair bound);
                                with ``estimate=True`` also a CLEVER-estimated curve, drawn apart.
  ``cohen``                     Cohen et al.'s CERTIFY at each of ``cohen_n`` (n0 = 100).
  ``sequential``                gmcert's anytime-valid smoother in radius mode (radii capped at 2 sigma).
The smoothing base classifier is the same encoder + projection + head as the closed form.

Each method writes ``<out>/<method>.tsv`` (Cohen's columns plus samples, radius_kind, path),
resumable row by row; the run writes ``summary.json`` (seeds, versions, configuration),
``summary.md`` and two plots.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gmcert.errors import DataError
from gmcert.report import (
    CertifyWriter, certificate_row, parse_seconds, plot_certified_accuracy, summarize, write_json_atomic,
    write_text_atomic,
)

METHODS = ("gm-exact", "gm-closed", "cohen", "sequential", "srs", "srs-verified")
N_PILOT = 32  # the sequential smoother's pilot draws (``Smoother.certify_sequential``'s default)


@dataclass
class CompareConfig:
    """Everything that determines a comparison's numbers (recorded in ``summary.json``)."""

    methods: list = field(default_factory=lambda: ["gm-exact", "cohen", "sequential"])
    sigma: float = 0.25
    alpha: float = 0.001
    radii: list = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.375, 0.5])
    cohen_n: list = field(default_factory=lambda: [200])
    n0: int = 32
    max_samples: int = 300
    radius_tol: float = 0.03  # sequential radius mode stops within this many sigma of fixed-n CERTIFY
    estimate: bool = False
    seed: int = 0
    batch_size: int = 250
    #: smooth another model (a noise-trained base) on the same inputs, beside this one's closed form
    smoothing_model: str | None = None
    #: serialized smoothing of a DEQ base (method "srs"): solver steps per warm solve (one row each),
    #: a full cold batch every ``warmup_interval`` batches, ``audit_size`` chain samples re-solved cold;
    #: "srs-verified" (a contractive DEQ): the most warm steps tried before a cold solve, no audit
    srs_steps: list = field(default_factory=lambda: [1, 3])
    warmup_interval: int = 10
    audit_size: int = 1000
    #: turns a radius on the model's input into one on the images given: 1 / sqrt(3) for grey images
    #: repeated to RGB (``gmcert.inputs.Inputs.radius_scale``); every TSV radius is on the images
    radius_scale: float = 1.0
    #: the content of what the run reads (model digests, the inputs' content identity): a rerun in
    #: the same --out on a file overwritten at the same path is refused, not merged
    identity: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise DataError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise DataError(f"sigma must be a positive number, got {self.sigma}")
        if not 0 < self.alpha < 1:
            raise DataError(f"alpha must be in (0, 1), got {self.alpha}")
        bad = [r for r in self.radii if not (math.isfinite(r) and r >= 0)]
        if bad or not self.radii:
            raise DataError(f"radii must be finite and >= 0, got {bad or self.radii}")
        if any(int(n) < 1 for n in self.cohen_n) or self.n0 < 1 or self.max_samples < 1:
            raise DataError(f"cohen_n, n0 and max_samples must be positive, got {self.cohen_n}, {self.n0}, "
                            f"{self.max_samples}")
        if "sequential" in self.methods and not self.max_samples > N_PILOT:
            raise DataError(f"max_samples ({self.max_samples}) must exceed the sequential smoother's "
                            f"{N_PILOT} pilot draws")
        audit_ok = "srs" not in self.methods or 0 <= self.audit_size <= min(int(n) for n in self.cohen_n)
        if {"srs", "srs-verified"} & set(self.methods) and not (
                self.srs_steps and min(self.srs_steps) >= 1 and self.warmup_interval >= 1 and audit_ok):
            raise DataError(f"srs needs steps >= 1, warmup_interval >= 1 and 0 <= audit_size <= every Cohen n; got "
                            f"{self.srs_steps}, {self.warmup_interval}, {self.audit_size}, {self.cohen_n}")
        if not (math.isfinite(self.radius_tol) and self.radius_tol > 0):
            raise DataError(f"radius_tol must be a positive number (in units of sigma), got {self.radius_tol}")

    def method_names(self) -> list[str]:
        names, other = [], f"-of-{Path(self.smoothing_model).name}" if self.smoothing_model else ""
        for method in self.methods:
            if method in ("cohen", "srs", "srs-verified"):
                prefix = "srsv" if method == "srs-verified" else "srs"
                names += [f"cohen-n{int(n)}{other}" for n in self.cohen_n] if method == "cohen" else \
                    [f"{prefix}{int(k)}-n{int(n)}{other}" for n in self.cohen_n for k in self.srs_steps]
            else:
                names.append(method if method.startswith("gm-") else method + other)
            if self.estimate and method.startswith("gm-"):
                names.append(f"{method}-estimate")  # drawn as its own, dashed curve: not a certificate
        return names


def package_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("gmcert", "numpy", "scipy", "scikit-learn", "torch", "timm", "faiss-cpu"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def _run_method(name, pipeline, smoother, x, config, smoothed=None):
    """One input, one method -> Certificate (prediction as a label)."""
    import torch

    if name.startswith("gm-"):
        method = "exact" if name.startswith("gm-exact") else "closed_form"
        lipschitz = "estimate" if name.endswith("-estimate") else "auto"
        return pipeline.certify(x[None], method=method, lipschitz=lipschitz)[0]
    start = time.perf_counter()
    image = torch.as_tensor(x, dtype=torch.float32)
    if name.startswith("srsv"):  # "srsv<steps>-n<n>[-of-<model>]": verified, a contractive DEQ
        steps, n = (int(v) for v in name[len("srsv"):].split("-of-")[0].split("-n"))
        cert = smoother.certify_serialized(image, n0=config.n0, n=n, alpha=config.alpha, steps=steps, verify=True,
                                           batch_size=config.batch_size)
    elif name.startswith("srs"):  # "srs<steps>-n<n>[-of-<model>]"
        steps, n = (int(v) for v in name[len("srs"):].split("-of-")[0].split("-n"))
        cert = smoother.certify_serialized(image, n0=config.n0, n=n, alpha=config.alpha, steps=steps,
                                           warmup_interval=config.warmup_interval, audit_size=config.audit_size,
                                           batch_size=config.batch_size)
    elif name.startswith("cohen-n"):
        n = int(name[len("cohen-n"):].split("-of-")[0])  # "cohen-n1000" or "cohen-n1000-of-<model>"
        cert = smoother.certify(image, n0=config.n0, n=n, alpha=config.alpha, batch_size=config.batch_size)
    else:
        from gmcert.smoothing.smoother import HeadPrior

        cert = smoother.certify_sequential(image, alpha=config.alpha, max_radius=2 * config.sigma,
                                           max_samples=config.max_samples, prior=HeadPrior(),
                                           radius_tol=config.radius_tol * config.sigma)
    cert = (smoothed or pipeline).label_smoothed(cert)
    cert.time = time.perf_counter() - start
    return cert


def run_compare(pipeline, X, labels, index, out, config: CompareConfig, progress=True, smoothed=None) -> dict:
    """Run every method of ``config`` on inputs ``X`` (with ``labels``, TSV ``index``) into ``out``.

    Under torchrun each rank certifies its share of the inputs and rank 0 merges and reports; the
    others return None.

    ``smoothed``: the pipeline that the smoothing methods smooth (``config.smoothing_model``, loaded and
    checked by the caller); default ``pipeline`` itself.
    """
    from tqdm import tqdm

    if len(index) == 0:
        raise DataError("no inputs to compare")
    from gmcert.distributed import barrier, current, shard
    from gmcert.distributed.rows import ShardedRows

    w = current()
    out = Path(out)
    check_run_dir(out, config)
    if w.main:
        out.mkdir(parents=True, exist_ok=True)
        _claim_run_dir(out, config)
    barrier(w)
    names = config.method_names()
    writers = {name: ShardedRows(out / f"{name}.tsv") for name in names}
    # each rank takes its share of every method's remaining inputs (the same lists on every rank)
    todo = {name: shard([i for i, idx in enumerate(index) if int(idx) not in wr.done], w)
            for name, wr in writers.items()}
    total = sum(len(t) for t in todo.values())
    with tqdm(total=total, desc="compare", unit="cert", disable=not progress or not w.main) as bar:
        for name in names:
            # A fresh, seeded generator per method: rerunning one method alone gives the same rows.
            smoother = (smoothed or pipeline).smoother(config.sigma, config.seed)
            bar.set_postfix_str(name)
            for i in todo[name]:
                # Per-input seeds (never the rank's): a resumed or sharded run draws the same noise
                # as one uninterrupted process.
                smoother.reseed(config.seed + int(index[i]))
                cert = _run_method(name, pipeline, smoother, X[i], config, smoothed)
                writers[name].write(certificate_row(int(index[i]), int(labels[i]),
                                                    cert.in_image_units(config.radius_scale)))
                bar.update(1)
    results = {name: writers[name].close() for name in names}
    return write_reports(results, out, config, pipeline) if w.main else None


def check_run_dir(out, config: CompareConfig) -> None:
    """Refuse, without writing anything, to resume a run in ``out`` made with other settings (its
    rows would be mixed with rows that answer a different question)."""
    path = Path(out) / "config.json"
    if not path.exists():
        return
    wanted = json.loads(json.dumps(asdict(config)))  # as it reads back from JSON
    try:
        found = json.loads(path.read_text())
    except (ValueError, OSError):
        raise DataError(f"{path} is not valid JSON; delete it or choose another --out") from None
    if not isinstance(found, dict):
        raise DataError(f"{path} holds no compare settings; delete it or choose another --out")
    changed = sorted(k for k in set(wanted) | set(found) if wanted.get(k) != found.get(k))
    if "identity" in changed and isinstance(found.get("identity"), dict):
        parts = sorted(k for k in set(wanted["identity"]) | set(found["identity"])
                       if wanted["identity"].get(k) != found["identity"].get(k))
        changed[changed.index("identity")] = f"identity: the content of {', '.join(parts)} changed"
    if changed:
        raise DataError(f"{out} holds a compare run with other settings ({', '.join(changed)}); "
                        f"rerun with the same settings to resume it, or choose another --out")


def _claim_run_dir(out: Path, config: CompareConfig):
    """Record the settings in ``out/config.json`` (a resumed run has checked them already)."""
    path = out / "config.json"
    if not path.exists():
        write_json_atomic(path, json.loads(json.dumps(asdict(config))))


def write_reports(results: dict, out: Path, config: CompareConfig, pipeline=None) -> dict:
    summaries = {}
    curves = {}
    for name, rows in results.items():
        summary = summarize(rows, config.radii)
        summary["mean_time"] = float(np.mean([parse_seconds(r["time"]) for r in rows]))
        summaries[name] = summary
        kinds = summary["rows_by_radius_kind"]
        label = name if set(kinds) <= {"probabilistic"} else f"{name} ({'/'.join(kinds)})"
        curves[label] = (config.radii, summary["certified_accuracy"])
        if "estimated_certified_accuracy" in summary:
            curves[f"{name} (estimate)"] = (config.radii, summary["estimated_certified_accuracy"])
        write_json_atomic(out / f"{name}.json", summary)
    record = {
        "config": asdict(config), "versions": package_versions(), "methods": summaries,
        "model": getattr(pipeline, "metadata", {}), "n_inputs": len(next(iter(results.values()))),
    }
    write_json_atomic(out / "summary.json", record)
    write_text_atomic(out / "summary.md", markdown_table(summaries, config))
    plot_certified_accuracy(curves, out / "certified_accuracy.png",
                            title=f"sigma={config.sigma}, alpha={config.alpha}, n={record['n_inputs']}")
    plot_samples(results, out / "samples.png")
    return record


def markdown_table(summaries: dict, config: CompareConfig) -> str:
    radii = config.radii
    head = ["method", "clean acc"] + [f"r={r:g}" for r in radii] + ["ACR", "samples/input", "s/input", "kind"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        cells = [name, f"{s['clean_accuracy']:.3f}"] + [f"{a:.3f}" for a in s["certified_accuracy"]]
        cells += [f"{s['average_certified_radius']:.3f}", f"{s['mean_samples']:.0f}", f"{s['mean_time']:.3g}",
                  "/".join(s["rows_by_radius_kind"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_samples(results: dict, path) -> None:
    """Distribution of model evaluations per input, one histogram per method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmcert.atomic import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    top = max(max(r["samples"] for r in rows) for rows in results.values())
    bins = np.logspace(0, math.log10(max(top, 10)) + 0.1, 40)
    for name, rows in results.items():
        ax.hist([max(r["samples"], 1) for r in rows], bins=bins, histtype="step", label=name, linewidth=1.5)
    ax.set(xscale="log", xlabel="model evaluations per input", ylabel="inputs")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


__all__ = ["CompareConfig", "METHODS", "check_run_dir", "run_compare"]

"""The parts of ``scripts/bench_fmnist.py`` that are not one ``gmcert compare`` curve: the sequential
engine in target mode, the oracle that knows p_A, and the hybrid router.

* Target mode: ``Smoother.certify_batch(target_radii=r*)`` on the same base and inputs as Cohen's
  CERTIFY, for r* = sigma / 2 and sigma. Its answer per input (certified at r*, and correct) is set
  beside Cohen's ("radius >= r*", correct); the figure is Cohen's draws over target mode's.
* The oracle: for each input, the smallest fixed n whose CERTIFY radius at that input's p_A (read
  back from Cohen's radius at n: the n_A whose Clopper-Pearson bound gives it) comes within the
  radius tolerance of the n-draw radius (``bench_smoothing.oracle_fixed_n_cost``). No procedure
  that must learn p_A spends less on average, so Cohen's draws over the oracle's are the physical
  limit of radius mode's savings.
* The hybrid: :func:`gmcert.hybrid.iter_certify_hybrid` (closed form where its exact radius
  clears the route threshold, sequential smoothing elsewhere); the threshold is calibrated on
  training rows (``choose_route_threshold``), never on the test images.

Every part writes a Cohen-format TSV through :class:`gmcert.report.CertifyWriter`, so a killed run
resumes where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import ndtr
from tqdm import tqdm

from bench_smoothing import oracle_fixed_n_cost
from gmcert.report import CertifyWriter, certificate_row, read_tsv
from gmcert.smoothing.stats import clopper_pearson_lower


def n_a_from_radius(radius: float, n: int, alpha: float, sigma: float) -> int:
    """The count n_A whose Clopper-Pearson lower bound at (n, alpha) is the one that gave ``radius``
    (the largest n_A whose bound does not exceed Phi(radius / sigma)): Cohen's TSV keeps the radius,
    not the count. A zero radius (abstention) reads as n_A = n / 2."""
    if radius <= 0:
        return n // 2
    want = ndtr(radius / sigma)
    lo, hi = n // 2, n
    while lo < hi:  # the bound grows with n_A
        mid = (lo + hi + 1) // 2
        if clopper_pearson_lower(mid, n, alpha) <= want * (1 + 1e-12):
            lo = mid
        else:
            hi = mid - 1
    return lo


def oracle(cohen_rows, n: int, n0: int, alpha: float, sigma: float, tol: float) -> float:
    """Mean draws per input of the oracle that knows each p_A (radii capped at 2 sigma, within
    ``tol`` sigma of the n-draw radius), its ``n0`` selection draws included."""
    p_a = np.array([n_a_from_radius(float(r["radius"]), n, alpha, sigma) / n for r in cohen_rows])
    return float(np.mean(oracle_fixed_n_cost(p_a, 2 * sigma, tol * sigma, sigma, alpha, n) + n0))


def target_mode(pipeline, x, labels, index, folder: Path, sigma, alpha, n, targets, seed, chunk=25):
    """``{r*: rows}`` of target mode, one TSV per target, ``chunk`` inputs per ``certify_batch``."""
    from gmcert.smoothing.smoother import HeadPrior

    smoother, results = pipeline.smoother(sigma, seed), {}
    for target in targets:
        path = folder / f"target-{target:g}.tsv"
        settings = {"target": target, "sigma": sigma, "alpha": alpha, "max_samples": n, "seed": seed}
        with CertifyWriter(path, settings=settings) as writer:
            todo = [i for i in range(len(index)) if int(index[i]) not in writer.done]
            for begin in tqdm(range(0, len(todo), chunk), desc=f"target {target:g}", unit="chunk", leave=False):
                part = todo[begin:begin + chunk]
                smoother.reseed(seed + int(index[part[0]]))
                start = time.perf_counter()
                certs = smoother.certify_batch(torch.as_tensor(x[part]), target_radii=target, alpha=alpha,
                                               max_samples=n, prior=HeadPrior())
                for i, cert in zip(part, certs):
                    cert = pipeline.label_smoothed(cert)
                    cert.time = (time.perf_counter() - start) / len(part)
                    writer.write(certificate_row(int(index[i]), int(labels[i]), cert))
        results[target] = read_tsv(path)
    return results


def compare_targets(target_rows, cohen_rows, n_cohen: int):
    """Lines: per target, certified-and-correct counts of each, disagreements, and draws ratio."""
    cohen = {int(r["idx"]): r for r in cohen_rows}
    lines, ratios = [], {}
    for target, rows in target_rows.items():
        rows = [r for r in rows if int(r["idx"]) in cohen]
        mine = np.array([bool(r["correct"]) and float(r["radius"]) >= target for r in rows])
        theirs = np.array([bool(cohen[int(r["idx"])]["correct"]) and float(cohen[int(r["idx"])]["radius"]) >= target
                           for r in rows])
        draws = float(np.mean([int(r["samples"]) for r in rows]))
        ratios[target] = n_cohen / draws
        lines.append(f"target mode r* = {target:g}: certified {mine.mean():.3f} (Cohen {theirs.mean():.3f}); "
                     f"{int(np.sum(mine & ~theirs))} inputs certified only by target mode, "
                     f"{int(np.sum(~mine & theirs))} only by Cohen; {draws:.0f} draws/input, "
                     f"{ratios[target]:.0f}x fewer than Cohen's {n_cohen}")
    return lines, ratios


def hybrid(pipeline, calibration, x, labels, index, folder: Path, sigma, alpha, n, target, seed):
    """The hybrid router's rows (``hybrid.tsv``): closed form above the calibrated threshold tau,
    sequential smoothing in target mode at ``target`` elsewhere."""
    from gmcert.hybrid import FallbackPolicy, choose_route_threshold, iter_certify_hybrid

    folder.mkdir(parents=True, exist_ok=True)
    policy = FallbackPolicy(target_radius=target, sigma=sigma, alpha=alpha, max_samples=n, seed=seed)
    tau_file = folder / "route_threshold.txt"
    if tau_file.exists():
        policy.route_threshold = float(tau_file.read_text())
    else:
        policy.route_threshold = choose_route_threshold(pipeline, *calibration, policy)
        tau_file.write_text(repr(policy.route_threshold) + "\n")
    path = folder / "hybrid.tsv"
    settings = {"target": target, "sigma": sigma, "alpha": alpha, "max_samples": n, "seed": seed,
                "tau": policy.route_threshold}
    with CertifyWriter(path, settings=settings) as writer:
        todo = np.array([i for i in range(len(index)) if int(index[i]) not in writer.done], dtype=int)
        if len(todo):
            certs = iter_certify_hybrid(pipeline, x[todo], policy, seeds=[int(index[i]) for i in todo])
            for i, cert in tqdm(zip(todo, certs), total=len(todo), desc="hybrid", unit="input", leave=False):
                writer.write(certificate_row(int(index[i]), int(labels[i]), cert))
    return read_tsv(path), policy.route_threshold


def lite0(args, calibration, x, labels, index, out: Path, n_inputs: int, n: int):
    """The pretrained card as a user runs it: ``gmcert fit --encoder <lite0 at 32 px>`` on the training
    split (the head on two noisy copies of each image at sigma 0.25: its closed-form radii are near 0
    through a deep encoder, so smoothing serves nearly every input), ``gmcert diagnose``, then the hybrid router (target mode at 0.25 in grey units,
    at most ``n`` draws) on the first ``n_inputs`` images, smoothing at sigma 0.25 per grey pixel
    (0.25 sqrt(3) on the RGB input that repeats it). Returns (rows, tau, mismatch lines, pipeline)."""
    from gmcert.cli import main as gmcert
    from gmcert.pipeline import Pipeline

    root = Path(__file__).resolve().parent.parent
    model = out / "models" / "lite0-32"
    card = out / "models" / "efficientnet_lite0_32.toml"
    if not card.exists():  # the shipped card at 32 px; the weights stay the package's
        card.parent.mkdir(parents=True, exist_ok=True)
        text = (root / "encoders" / "efficientnet_lite0.toml").read_text()
        card.write_text(text.replace('name = "efficientnet_lite0"', 'name = "efficientnet_lite0_32"')
                        .replace("input_size = [3, 224, 224]", "input_size = [3, 32, 32]"))
    if not (model / "pipeline.json").exists() and gmcert(["fit", "--data", "fashion-mnist", "--encoder", str(card),
                                                          "--noise-sigma", "0.25", "--noise-copies", "2",
                                                          *(["--limit", str(args.train_limit)] if args.train_limit else []),
                                                          "--out", str(model)]) != 0:
        raise SystemExit("gmcert fit failed")
    if not (model / "mismatch.json").exists() and gmcert(["diagnose", "--model", str(model)]) != 0:
        raise SystemExit("gmcert diagnose failed")
    import json

    mismatch = json.loads((model / "mismatch.json").read_text())
    pipeline = Pipeline.load(model)
    # The card takes RGB: each grey image is repeated to 3 channels, as `gmcert certify --data` does. A
    # radius r there covers grey perturbations of norm below r / sqrt(3) only (a grey change d is a
    # change sqrt(3) |d| of the RGB input), so the rows are read back in grey units.
    rgb = lambda a: np.repeat(a, 3, axis=1)  # noqa: E731
    m = max(20, n_inputs // 2)
    rows, tau = hybrid(pipeline, (rgb(calibration[0][:m]), calibration[1][:m]), rgb(x[:n_inputs]), labels[:n_inputs],
                       index[:n_inputs], out / "lite0-hybrid", 0.25 * np.sqrt(3), args.alpha, n, 0.25 * np.sqrt(3),
                       args.seed)
    rows = [{**r, "radius": float(r["radius"]) / np.sqrt(3)} for r in rows]
    resize = pipeline.metadata.get("resize") or {}
    notes = [f"lite0-hybrid: efficientnet_lite0 at 32 px (resize {resize.get('from')} -> {resize.get('to')}, norm "
             f"{resize.get('norm')}), {len(rows)} images, target mode at most {n} draws; tau = {tau:.4g}; "
             f"{sum(r['path'] == 'closed_form' for r in rows)} served by the closed form; gmcert diagnose: KL to the "
             f"mixture {mismatch['kl']} (interval {mismatch['kl_interval']}), per class "
             f"{', '.join(str(round(float(v), 2)) for v in mismatch['kl_per_class'])}"]
    return rows, tau, notes, pipeline, rgb

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


def capped(rows, cap):
    return np.minimum([float(r["radius"]) for r in rows], cap)


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

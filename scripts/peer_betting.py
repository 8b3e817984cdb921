"""The peer of gmcert's target mode: a betting confidence sequence checked after every draw.

Written here from the definitions (Voracek, NeurIPS 2024, and the betting CS literature it builds
on), not from their code. For target radius r*, p0 = Phi(r* / sigma), and draws X_i = 1 when the
base classifier returns the selected class c_A:

* wealth of the Krichevsky-Trofimov mixture against Bernoulli(p0):
  W_t = B(h + 1/2, t - h + 1/2) / B(1/2, 1/2) / (p0^h (1 - p0)^(t - h)), h hits in t draws;
* certified (p_A > p0, so radius >= r*) at the first t with W_t >= 1/alpha and h / t > p0: W_t(p) is
  at least W_t(p0) for every p <= p0 below the hit rate, so the KT confidence sequence, valid at
  every t by Ville's inequality, then excludes all of [0, p0];
* out of reach at the first t with W_t >= 1/alpha and h / t < p0 (a stopping rule, no claim);
* otherwise stop at ``cap`` draws, not certified.

Every draw is checked: the count returned is the draw at which the test stopped, as a
per-draw implementation would have spent. Class selection is separate (``select_32`` or gmcert's
pilot) and its draws are added.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import betaln, ndtr


def _first_crossing(bits, hits0, t0, p0, log_threshold):
    """(index in ``bits`` of the first stop or -1, hits, draws, certified) of the wealth test."""
    h = hits0 + np.cumsum(bits)
    t = t0 + np.arange(1, len(bits) + 1)
    log_w = betaln(h + 0.5, t - h + 0.5) - betaln(0.5, 0.5) - h * np.log(p0) - (t - h) * np.log1p(-p0)
    stop = np.flatnonzero(log_w >= log_threshold)
    if not stop.size:
        return -1, int(h[-1]), int(t[-1]), False
    i = int(stop[0])
    return i, int(h[i]), int(t[i]), bool(h[i] > p0 * t[i])


def betting_target(base, x, c_a, target, sigma, alpha, cap, generator, chunk=16):
    """One input: (certified, draws) of the KT betting test for class ``c_a`` at radius ``target``."""
    p0 = float(ndtr(target / sigma))
    hits = draws = 0
    while draws < cap:
        size = min(chunk, cap - draws)
        noise = sigma * torch.randn((size, *x.shape), generator=generator)
        with torch.no_grad():
            bits = (base(x[None] + noise).argmax(1) == c_a).numpy().astype(np.int64)
        i, h, t, certified = _first_crossing(bits, hits, draws, p0, np.log(1.0 / alpha))
        if i >= 0:
            return certified, t
        hits, draws, chunk = h, t, min(2 * chunk, 4096)
    return False, draws


def select_32(base, x, sigma, generator, n=32):
    """Cohen-style selection: the most frequent class in ``n`` separate draws."""
    noise = sigma * torch.randn((n, *x.shape), generator=generator)
    with torch.no_grad():
        votes = torch.bincount(base(x[None] + noise).argmax(1), minlength=2)
    return int(votes.argmax()), n


__all__ = ["betting_target", "select_32"]


def compare_target_mode(head, X, sigma, alpha, n_cohen, targets, seeds, make_smoother):
    """gmcert's target mode (defaults, head prior) against the peer, with 32 selection draws and
    with gmcert's own selection, on the same inputs; Cohen's CERTIFY (n0 = 100, ``n_cohen``) decides
    what is right. Prints one row per target, seed and method; returns the rows."""
    from gmcert.smoothing.smoother import HeadPrior

    X = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    cohen_s = make_smoother(1)
    cohen = [cohen_s.certify(x, 100, n_cohen, alpha) for x in X]
    cohen_pred, cohen_radius = np.array([c.prediction for c in cohen]), np.array([c.radius for c in cohen])
    rows = []
    print(f"\nTARGET MODE AGAINST THE PEER (betting CS checked at every draw, cap {n_cohen}); {len(X)} inputs, "
          f"agreement with Cohen CERTIFY n0=100 n={n_cohen}")
    print(f"{'method':34s} {'target':>7s} {'seed':>5s} {'mean evals':>11s} {'median':>7s} {'agree':>7s}")
    for target in targets:
        right = (cohen_pred >= 0) & (cohen_radius >= target)
        for seed in seeds:
            s = make_smoother(1000 + seed)
            certs = s.certify_batch(X, alpha=alpha, target_radii=target, max_samples=n_cohen, prior=HeadPrior())
            pred = np.array([c.prediction for c in certs])
            dec = (pred >= 0) & (np.array([c.radius for c in certs]) >= target)
            results = {"gmcert target (head prior)": (dec, pred, np.array([c.samples for c in certs]))}
            generator = torch.Generator().manual_seed(2000 + seed)
            picks = [select_32(head, x, sigma, generator) for x in X]
            classes, pilot, _, drawn = make_smoother(3000 + seed)._select(X, 8, HeadPrior(), False, extend=True)
            for name, choice in (("peer, 32 selection draws", [(c, n) for c, n in picks]),
                                 ("peer, gmcert's selection", list(zip(classes.tolist(), drawn.tolist())))):
                runs = [betting_target(head, x, c, target, sigma, alpha, n_cohen, generator) for x, (c, _) in
                        zip(X, choice)]
                ok = np.array([r[0] for r in runs])
                evals = np.array([r[1] + n for r, (_, n) in zip(runs, choice)])
                results[name] = (ok, np.array([c for c, _ in choice]), evals)
            for name, (dec, pred, evals) in results.items():
                agree = float(np.mean((dec == right) & (~dec | (pred == cohen_pred))))
                rows.append({"method": name, "target": target, "seed": seed, "mean": float(evals.mean()),
                             "median": float(np.median(evals)), "agree": agree})
                print(f"{name:34s} {target:7.3f} {seed:5d} {evals.mean():11.0f} {np.median(evals):7.0f} "
                      f"{100 * agree:6.1f}%")
    for target in targets:
        ours = [r for r in rows if r["target"] == target and r["method"].startswith("gmcert")]
        peer = [r for r in rows if r["target"] == target and r["method"] == "peer, 32 selection draws"]
        met = all(o["median"] <= p["median"] and o["mean"] <= p["mean"] / 3 and o["agree"] >= 0.99
                  for o, p in zip(ours, peer))
        print(f"target {target}: gmcert median {[o['median'] for o in ours]} vs peer {[p['median'] for p in peer]}; "
              f"mean ratio peer/gmcert {[round(p['mean'] / o['mean'], 1) for o, p in zip(ours, peer)]}; "
              f"agreement {[round(o['agree'], 3) for o in ours]}: target {'met' if met else 'NOT met'}")
    return rows

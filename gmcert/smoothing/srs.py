"""Serialized randomized smoothing (SRS) of a deep-equilibrium base, with a sound count.

The counted samples run as a chain of batches: batch t's solves start from batch t-1's fixed points
(sample j from sample j) and take ``steps`` plain fixed-point steps; every ``warmup_interval``-th
batch is solved in full from a cold start. The classifier certified is the *standard* DEQ: a cold
start and a full solve (``DEQNet``'s evaluation solve). The warm answers are corrected by a blind
audit (:mod:`gmcert.smoothing.serialized`, where the argument is): ``audit_size`` chain indices,
drawn before any counted noise from the selection stream, are re-solved cold at the same noise.
Selection (``n0`` draws) uses full cold solves, so c_A is the standard DEQ's guess.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from scipy.special import ndtri

from gmcert.errors import DataError
from gmcert.results import ABSTAIN, Certificate
from gmcert.smoothing.serialized import audit_indices, serialized_lower_bound


def _deqs(base) -> list:
    found = [m for m in base.modules() if hasattr(m, "serial_state")] if hasattr(base, "modules") else []
    if not found:
        raise DataError("serialized smoothing needs a deep-equilibrium base (an encoder such as gmcert_deq)")
    return found


def _set(deqs, state, steps):
    for deq in deqs:
        deq.serial_state, deq.serial_steps = state, int(steps)


@torch.no_grad()
def certify_serialized(smoother, x, n0: int, n: int, alpha: float, steps: int = 3, warmup_interval: int = 10,
                       audit_size: int = 1000, alpha_split: float = 0.5, batch_size=None) -> Certificate:
    """Cohen's CERTIFY for the standard DEQ's smoothed classifier, its n counted samples drawn by SRS.

    ``samples`` counts every base evaluation (selection, chain, audit re-solves); ``extra`` holds
    ``solver_steps`` (cell evaluations, all solves together), ``audit_disagreements`` (X) and
    ``disagreements_upper`` (the bound on the chain's D), ``p_lower`` and the warm count ``n_a``.
    """
    start = time.perf_counter()
    if not (int(steps) >= 1 and int(warmup_interval) >= 1 and 0 <= int(audit_size) <= int(n) and int(n0) >= 1):
        raise DataError(f"need steps >= 1, warmup_interval >= 1, n0 >= 1 and 0 <= audit_size <= n; got {steps}, "
                        f"{warmup_interval}, {n0}, {audit_size} (n = {n})")
    deqs = _deqs(smoother.base)
    x = smoother._as_batch(x, single=True)[0]
    batch_size = int(batch_size or smoother.batch_size)
    _set(deqs, None, 1)
    evaluations = [0]

    def run(batch):
        scores = smoother._scores(batch)
        evaluations[0] += deqs[0].last_steps * len(batch)
        return scores.argmax(1)

    try:
        counts = torch.zeros(smoother.num_classes, dtype=torch.long, device=smoother.device)
        for size in [batch_size] * (n0 // batch_size) + [n0 % batch_size]:
            if size:
                counts += torch.bincount(run(x + smoother._noise(size, x.shape, smoother._pilot_gen)),
                                         minlength=smoother.num_classes)
        c_a = int(counts.argmax())
        # the audit set: drawn before any counted noise, from the selection stream, never shown to the chain
        seed = int(torch.randint(2 ** 62, (1,), generator=smoother._pilot_gen, device=smoother.device))
        audit = np.zeros(int(n), dtype=bool)
        audit[audit_indices(int(n), int(audit_size), np.random.default_rng(seed))] = True
        n_a = disagreements = audited = 0
        state = None
        for t, begin in enumerate(range(0, int(n), batch_size)):
            size = min(batch_size, int(n) - begin)
            batch = x + smoother._noise(size, x.shape, smoother._count_gen)
            warm = state is not None and t % int(warmup_interval) != 0
            _set(deqs, state if warm else None, steps)
            answers = run(batch)
            state = deqs[0].last_state
            n_a += int((answers == c_a).sum())
            rows = torch.as_tensor(np.flatnonzero(audit[begin:begin + size]), device=smoother.device)
            if warm and len(rows):  # a cold batch's answers are the standard DEQ's own: nothing to audit
                _set(deqs, None, 1)
                cold = run(batch[rows])
                disagreements += int(((answers[rows] == c_a) & (cold != c_a)).sum())
                audited += len(rows)
    finally:
        _set(deqs, None, 1)
    p_lower, d_up = serialized_lower_bound(n_a, disagreements, int(n), int(audit_size), alpha, alpha_split)
    p_lower, d_up = float(p_lower[0]), int(d_up[0])
    prediction, radius = (ABSTAIN, 0.0) if p_lower < 0.5 else (c_a, smoother.sigma * float(ndtri(p_lower)))
    return Certificate(prediction, radius, "probabilistic", "smoothing", samples=int(n0) + int(n) + audited,
                       # the TSV's stop_reason column carries the chain's own figures
                       stop_reason=f"serialized:solver_steps={evaluations[0]},audit={disagreements}/{audited},"
                                   f"d_upper={d_up}", time=time.perf_counter() - start,
                       extra={"p_lower": p_lower, "n_a": n_a, "solver_steps": evaluations[0],
                              "audit_disagreements": disagreements, "disagreements_upper": d_up})

"""Serialized randomized smoothing (SRS) of a deep-equilibrium base, with a sound count.

The counted samples run as a chain of batches: batch t's solves start from batch t-1's fixed points
(sample j from sample j) and take ``steps`` plain fixed-point steps; every ``warmup_interval``-th
batch is solved in full from a cold start. The classifier certified is the *standard* DEQ: a cold
start and a full solve (the DEQ's evaluation solve), in the layout-free arithmetic both DEQs
evaluate in (:func:`gmcert.networks.deq.layout_free_arithmetic`: no TF32, cuDNN, oneDNN or NNPACK,
deterministic algorithms), where a sample's answer does not depend on the batch it is solved in.
With torch's default kernels it does, by up to 2.5e-4 in ``gmcert_deq``'s fixed point (measured
in :mod:`gmcert.networks.cdeq`), so that "the standard DEQ" would not be one classifier. The warm answers are corrected by a blind
audit (:mod:`gmcert.smoothing.serialized`, where the argument is): ``audit_size`` chain indices,
drawn before any counted noise from the selection stream, are re-solved cold at the same noise.
Selection (``n0`` draws) uses full cold solves, so c_A is the standard DEQ's guess.

For a contractive DEQ (``gmcert_cdeq``), :func:`certify_verified` needs no audit: each warm answer
is proven equal to the standard DEQ's (:mod:`gmcert.smoothing.verified`) or solved cold, so the
count is the standard DEQ's own and Cohen's CERTIFY applies to it unchanged.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy.special import ndtri

from gmcert.networks.arithmetic import layout_free_arithmetic
from gmcert.errors import DataError
from gmcert.results import ABSTAIN, Certificate
from gmcert.smoothing.serialized import audit_indices, serialized_lower_bound


def _deqs(base) -> list:
    found = [m for m in base.modules() if hasattr(m, "serial_state")] if hasattr(base, "modules") else []
    if not found:
        raise DataError("serialized smoothing needs a deep-equilibrium base (an encoder such as gmcert_deq)")
    return found


def _select(smoother, x, n0: int, batch_size: int, run) -> int:
    """c_A from ``n0`` selection draws (the selection stream), each answered by ``run(batch)``."""
    counts = torch.zeros(smoother.num_classes, dtype=torch.long, device=smoother.device)
    for size in [batch_size] * (n0 // batch_size) + [n0 % batch_size]:
        if size:
            counts += torch.bincount(run(x + smoother._noise(size, x.shape, smoother._pilot_gen)),
                                     minlength=smoother.num_classes)
    return int(counts.argmax())


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
        c_a = _select(smoother, x, int(n0), batch_size, run)
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


def _verified_parts(base):
    """``(encoder, deq, contraction, head geometry)`` of a pipeline base whose encoder is a
    contractive DEQ (``gmcert_cdeq``): encoder -> projection -> Gaussian head. Kept on the base
    until any of its parameters or buffers changes (their storage or version counters)."""
    state = [*base.parameters(), *base.buffers()] if isinstance(base, torch.nn.Module) else []
    key = tuple((t.data_ptr(), t._version) for t in state)
    cached = getattr(base, "_gmcert_verified", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    parts = _build_verified_parts(base)
    parts[3].precomputed  # noqa: B018  (computed once here, not inside the first certification)
    base._gmcert_verified = (key, parts)
    return parts


def _build_verified_parts(base):
    from gmcert.bounds.contraction import contraction_constants, is_contractive
    from gmcert.smoothing.verified import HeadGeometry

    parts = list(base) if isinstance(base, torch.nn.Sequential) else []
    deq = getattr(parts[0], "network", None) if parts else None
    if len(parts) != 3 or not is_contractive(deq) or not hasattr(parts[2], "chol"):
        raise DataError("verified serialized smoothing needs a pipeline whose encoder is a contractive DEQ "
                        "(gmcert_cdeq): encoder -> projection -> Gaussian head")
    projection, head = parts[1], parts[2]
    width = deq.num_features
    mean = getattr(projection, "mean", torch.zeros(width)).detach().cpu()
    weight = getattr(projection, "weight", torch.eye(width)).detach().cpu()
    geometry = HeadGeometry.build(mean, weight, head.means.cpu(), head.chol.cpu(), head.offset.cpu(),
                                  head.component_class.cpu(), head.n_classes)
    return parts[0], deq, contraction_constants(deq), geometry


def _chain_summary(deq, previous, now, u):
    """What :func:`gmcert.smoothing.verified.verify` reads, from the float32 chain values:
    ||z_k - z_{k-1}||, ||z_{k-1}||, ||z_k||, ||u||, z_k pooled as the encoder pools, and len(z)."""
    norms = [(now - previous).flatten(1).norm(dim=1), previous.flatten(1).norm(dim=1), now.flatten(1).norm(dim=1),
             u.flatten(1).norm(dim=1)]
    # float32 norms: their rounding is within verify's terms (residual_error; NORM_ROUNDING)
    return [v.double().cpu().numpy() for v in norms] + [deq.flatten(deq.pool(now)).double().cpu().numpy(),
                                                       now[0].numel()]


@torch.no_grad()
def certify_verified(smoother, x, n0: int, n: int, alpha: float, steps: int = 6, warmup_interval=None,
                     batch_size=None) -> Certificate:
    """Cohen's CERTIFY of a contractive DEQ's standard classifier, its counted samples drawn by SRS
    and each warm answer *verified* (:mod:`gmcert.smoothing.verified`): a sample takes up to
    ``steps`` warm fixed-point steps from the chain's previous state, one at a time, until its
    answer is proven equal to the standard DEQ's; one that is not proven by then is solved cold.
    Every counted answer is the standard DEQ's own, so the count, and the certificate, are exactly
    those of :meth:`Smoother.certify` at the same seed: no audit, the whole ``alpha`` for
    Clopper-Pearson. The chain starts from the selection draws' cold fixed points, so no counted
    batch needs to be cold; ``warmup_interval`` (default: never) still forces a cold batch every
    that many, as plain SRS does.

    ``extra``: ``solver_steps`` (cell evaluations, all solves), ``verified`` (warm answers proven),
    ``cold`` (samples of the chain's cold batches), ``fallback`` (warm samples not proven, then solved
    cold), ``p_lower``, ``n_a``; ``samples`` counts every base evaluation (n0 + n + fallback).

    It runs in the standard DEQ's layout-free arithmetic, and refuses (DataError) where that cannot
    be had (CUDA without deterministic cuBLAS) or where a batch's stem output changes with its
    layout by more than the ``STEM_RELATIVE`` premise allows (checked on every chain batch).
    """
    start = time.perf_counter()
    if not (int(steps) >= 1 and (warmup_interval is None or int(warmup_interval) >= 1) and int(n0) >= 1
            and int(n) >= 1):
        raise DataError(f"need steps >= 1, warmup_interval >= 1, n0 >= 1 and n >= 1; got {steps}, "
                        f"{warmup_interval}, {n0}, {n}")
    encoder, deq, contraction, geometry = _verified_parts(smoother.base)
    x = smoother._as_batch(x, single=True)[0]
    with layout_free_arithmetic(x.device):  # the standard DEQ's arithmetic, for the chain's own steps too
        return _certify_verified(smoother, x, n0, n, alpha, steps, warmup_interval, batch_size, start,
                                 (encoder, deq, contraction, geometry))


def _stem_checked(deq, encoder, batch):
    """The chain's injection u for ``batch``, and the premise ``STEM_RELATIVE`` states, checked: the
    same rows' stem in another layout (each half alone) must agree within a tenth of it, else the
    run is refused (the proofs would rest on an unchecked bound)."""
    from gmcert.smoothing.verified import STEM_RELATIVE

    def stem(b):
        return deq.stem((encoder.resize(b) - encoder.mean) / encoder.std)  # the encoder's own pass

    u = stem(batch)
    if len(batch) > 1:
        half = len(batch) // 2
        other = torch.cat([stem(batch[:half]), stem(batch[half:])])
        relative = float(((other - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1).clamp_min(1e-30)).max())
        if not relative <= STEM_RELATIVE / 10:
            raise DataError(f"verified serialized smoothing refused: the DEQ's stem output changes by {relative:.2e} "
                            f"(relative) with the batch layout on {batch.device}, above the {STEM_RELATIVE / 10:.0e} "
                            "its proofs allow; drop --verify (the audited SRS assumes nothing of the kind)")
    return u


def _certify_verified(smoother, x, n0, n, alpha, steps, warmup_interval, batch_size, start, parts):
    from gmcert.smoothing.stats import clopper_pearson_lower
    from gmcert.smoothing.verified import verify

    encoder, deq, contraction, geometry = parts
    batch_size = int(batch_size or smoother.batch_size)
    deq.serial_state = None  # cold solves below must be the standard DEQ's, whatever a caller left set
    evaluations, verified, cold_count = [0.0], 0, 0

    def cold(batch):  # the standard DEQ's answers; its fixed points stay in deq.last_state
        scores = smoother._scores(batch)
        evaluations[0] += deq.last_steps * len(batch)
        return scores.argmax(1)

    c_a = _select(smoother, x, int(n0), batch_size, cold)
    # the chain starts from the selection's fixed points (repeated to a batch): a warm start only
    state = deq.last_state
    state = state.repeat((batch_size + len(state) - 1) // len(state), 1, 1, 1)[:batch_size]
    n_a, unproven, reach, widest, earliest, first = 0, [], math.inf, 0.0, 0, int(steps)
    for t, begin in enumerate(range(0, int(n), batch_size)):
        size = min(batch_size, int(n) - begin)
        batch = x + smoother._noise(size, x.shape, smoother._count_gen)
        if warmup_interval is not None and t % int(warmup_interval) == 0 and t > 0:
            n_a += int((cold(batch) == c_a).sum())
            state, cold_count = deq.last_state, cold_count + size
            continue
        current = state[:size].clone()
        u = _stem_checked(deq, encoder, batch)
        deq.cell.prepare()
        z, u_left, left = current, u, torch.arange(size, device=smoother.device)  # the rows not proven yet
        for step in range(int(steps)):
            previous, z = z, deq.cell(z, u_left)
            evaluations[0] += len(left)
            if step < earliest and step < int(steps) - 1:  # no earlier step has proven anything yet
                continue
            ok, cls, rho = verify(*_chain_summary(deq, previous, z, u_left), contraction, geometry, reach)
            if ok.any():  # balls this wide were proven: rows with balls over twice as wide are not tried
                widest = max(widest, float(rho[ok].max()))
                reach, first = 2 * widest, min(first, step)
            n_a += int((cls[ok] == c_a).sum())
            verified += int(ok.sum())
            proven = torch.as_tensor(ok, device=smoother.device)
            current[left[proven]] = z[proven]
            z, u_left, left = z[~proven], u_left[~proven], left[~proven]
            if not len(left):
                break
        current[left] = z  # the unproven rows' warm iterates stay in the chain
        earliest = first  # from the next batch on, verification starts at the first step that proved anything
        unproven.append(batch[left])  # solved cold below, together
        state = current
    unproven = torch.cat(unproven) if unproven else x[:0]
    fallback = len(unproven)
    for begin in range(0, fallback, batch_size):
        n_a += int((cold(unproven[begin:begin + batch_size]) == c_a).sum())
    p_lower = float(clopper_pearson_lower(n_a, int(n), alpha))
    prediction, radius = (ABSTAIN, 0.0) if p_lower < 0.5 else (c_a, smoother.sigma * float(ndtri(p_lower)))
    solver_steps = int(round(evaluations[0]))
    # samples: every base evaluation; a warm sample that was not proven is evaluated twice
    return Certificate(prediction, radius, "probabilistic", "smoothing", samples=int(n0) + int(n) + fallback,
                       stop_reason=f"verified:solver_steps={solver_steps},verified={verified}/{int(n)},"
                                   f"cold={cold_count},fallback={fallback}", time=time.perf_counter() - start,
                       extra={"p_lower": p_lower, "n_a": n_a, "solver_steps": solver_steps, "verified": verified,
                              "cold": cold_count, "fallback": fallback})

"""The head's prediction in exact arithmetic: the class the certificates are about.

A certificate says that the *exact* head (real arithmetic on the stored float64 parameters) keeps
its class over a ball. A float64 argmax of the scores agrees with the exact one wherever the
computed top margin exceeds the scores' rounding bound (the slack of
:meth:`gmcert.latent.certificates.MixtureGeometry.component_terms`, which the certificates also
subtract). Where it does not, near a decision boundary, the float argmax may pick the other
class, so a deployed float head could flip inside a certified ball. :func:`exact_decisions`
decides those rows again without rounding:

* one component per class: each score ``-(z - mu)^T P (z - mu) - log det + 2 log w`` is a rational
  number (every float64 is one), computed in Python integers scaled by a power of two, so the
  comparison is exact;
* several components per class: class ``j`` beats ``k`` when ``sum_{m in j} exp(s_m / 2)`` exceeds
  ``sum_{m in k} exp(s_m / 2)``. The exponentials are bracketed in decimal arithmetic whose
  precision doubles until the brackets separate. By the Lindemann-Weierstrass theorem two such
  sums of exponentials of rationals are equal only when their exponents agree as multisets,
  which is checked exactly; so the loop ends, and a tie is a true tie.

Ties go to the lowest class index, as ``numpy.argmax`` breaks them. No torch here.
"""
from __future__ import annotations

import decimal
from fractions import Fraction

import numpy as np

#: decimal digits of the first bracket of a sum of exponentials; doubled until it separates
START_DIGITS = 40
MAX_DIGITS = 5000


def exact_decisions(geo, Z, s, slack):
    """Class indices ``(n,)`` of the exact head at latents ``Z (n, d)``.

    ``s``, ``slack`` ``(n, M)``: the computed component scores and their rounding bound. Rows whose
    float decision is beyond the bound keep it; the others are decided exactly.
    """
    scores = geo.class_scores(s)
    # a class score moves by at most its components' largest error (2 logsumexp(s/2) is
    # 1-Lipschitz in the sup norm), plus the logsumexp's own few roundings
    class_slack = np.stack([slack[:, members[members >= 0]].max(axis=1) for members in geo.class_components], axis=1)
    class_slack = class_slack + 1e-12 * (1.0 + np.abs(scores))
    top = scores.argmax(axis=1)
    rows = np.arange(len(Z))
    gap = scores[rows, top][:, None] - scores - class_slack[rows, top][:, None] - class_slack
    gap[rows, top] = np.inf
    out = top.copy()
    for i in np.flatnonzero((gap <= 0).any(axis=1)):
        candidates = np.flatnonzero(gap[i] <= 0).tolist() + [int(top[i])]
        out[i] = _exact_argmax(geo, Z[i], sorted(set(candidates)))
    return out


def _exact_argmax(geo, z, candidates):
    """The lowest-index class of the largest exact score among ``candidates`` (the others are
    beaten already, beyond the rounding bound)."""
    component_scores = {m: _exact_component_score(geo, z, m)
                        for k in candidates for m in geo.class_components[k] if m >= 0}
    best = candidates[0]
    for k in candidates[1:]:
        if _compare(geo, component_scores, k, best) > 0:
            best = k
    return best


def _exact_component_score(geo, z, m) -> Fraction:
    """``-(z - mu)^T P (z - mu) - log det + 2 log w`` for component ``m``, exactly."""
    v = [Fraction(float(a)) - Fraction(float(b)) for a, b in zip(z, geo.means[m])]
    scale = max(f.denominator for f in v)  # a power of two: every float64 is an integer over one
    vi = [int(f * scale) for f in v]
    P = geo.precisions[m]
    p_scale = max(Fraction(float(x)).denominator for x in P.ravel())
    Pi = [[int(Fraction(float(x)) * p_scale) for x in row] for row in P]
    quad = sum(vi[a] * sum(Pi[a][b] * vi[b] for b in range(len(vi))) for a in range(len(vi)))
    return (-Fraction(quad, scale * scale * p_scale) - Fraction(float(geo.log_dets[m]))
            + 2 * Fraction(float(geo.log_weights[m])))


def _compare(geo, component_scores, j, k) -> int:
    """Sign of ``S_j - S_k`` for the exact class scores."""
    sj = sorted(component_scores[m] for m in geo.class_components[j] if m >= 0)
    sk = sorted(component_scores[m] for m in geo.class_components[k] if m >= 0)
    if len(sj) == 1 and len(sk) == 1:
        return (sj[0] > sk[0]) - (sj[0] < sk[0])
    if sj == sk:  # equal multisets of exponents: a true tie (and the only kind there is)
        return 0
    digits = START_DIGITS
    while digits <= MAX_DIGITS:
        lo_j, hi_j = _exp_sum_bracket(sj, digits)
        lo_k, hi_k = _exp_sum_bracket(sk, digits)
        if lo_j > hi_k:
            return 1
        if hi_j < lo_k:
            return -1
        digits *= 2
    raise ArithmeticError(f"class scores still inseparable at {MAX_DIGITS} digits")


def _exp_sum_bracket(exponents, digits):
    """Decimal ``(lo, hi)`` with ``lo <= sum exp(e / 2) <= hi``."""
    context = decimal.Context(prec=digits, Emax=10 ** 9, Emin=-10 ** 9)
    lo = hi = decimal.Decimal(0)
    for e in exponents:
        half = e / 2
        x_lo = context.divide(decimal.Decimal(half.numerator), decimal.Decimal(half.denominator))
        # correctly rounded division and exp are within half an ulp: one step outward covers both
        e_lo = context.next_minus(context.exp(context.next_minus(x_lo)))
        e_hi = context.next_plus(context.exp(context.next_plus(x_lo)))
        lo = context.next_minus(context.add(lo, e_lo))
        hi = context.next_plus(context.add(hi, e_hi))
    return lo, hi

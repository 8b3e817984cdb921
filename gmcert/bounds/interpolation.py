"""Torch's 1-D interpolation weights in exact rational arithmetic, and the separable tap-by-tap
interpolation that :mod:`gmcert.bounds.rounding` runs with them (its resize step)."""
from __future__ import annotations

import math
from fractions import Fraction


def _cubic(x, a):
    x = abs(x)
    return ((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0


def exact_interpolation_weights(n_in: int, n_out: int, mode: str, antialias: bool) -> list:
    """Torch's 1-D interpolation weights (align_corners=False) in exact rational arithmetic.

    Per output index, a dict ``{input index: Fraction}`` of the nonzero weights (taps that torch
    clamps onto the same border pixel are added up). ``mode`` is ``bilinear`` or ``bicubic``.
    """
    rows, scale = [{} for _ in range(n_out)], Fraction(n_in, n_out)
    for i, row in enumerate(rows):
        if antialias:  # torch's separable anti-aliasing kernels (PIL's filters; bicubic a = -1/2)
            size = 2 if mode == "bilinear" else 4
            support, inv = (Fraction(size, 2) * scale, 1 / scale) if scale >= 1 else (Fraction(size, 2), Fraction(1))
            center = scale * (i + Fraction(1, 2))
            lo = max(int(center - support + Fraction(1, 2)), 0)
            xs = [(lo + j - center + Fraction(1, 2)) * inv
                  for j in range(min(int(center + support + Fraction(1, 2)), n_in) - lo)]
            w = [max(1 - abs(x), Fraction(0)) if mode == "bilinear" else _cubic(x, Fraction(-1, 2)) for x in xs]
            total = sum(w)
            taps = [(lo + j, v / total if total != 0 else v) for j, v in enumerate(w)]
        elif mode == "bilinear":
            src = max(scale * (i + Fraction(1, 2)) - Fraction(1, 2), Fraction(0))
            i0 = math.floor(src)
            lam = min(src - i0, Fraction(1))
            taps = [(i0, 1 - lam), (i0 + (1 if i0 < n_in - 1 else 0), lam)]
        else:  # bicubic, a = -3/4, taps clamped to the border
            src = scale * (i + Fraction(1, 2)) - Fraction(1, 2)
            i0 = math.floor(src)
            t = src - i0
            taps = [(min(max(k, 0), n_in - 1), _cubic(x, Fraction(-3, 4)))
                    for k, x in zip(range(i0 - 1, i0 + 3), (t + 1, t, 1 - t, 2 - t))]
        for j, v in taps:
            row[j] = row.get(j, 0) + v
    return [{j: v for j, v in row.items() if v != 0} for row in rows]


def _interpolate(x, terms, key):
    """Separable interpolation, tap by tap along H then W, with weights ``terms[key + axis]``."""
    for dim in (2, 3):
        if f"idx{dim}" not in terms:
            continue
        idx, w, y = terms[f"idx{dim}"], terms[f"{key}{dim}"], None
        for c in range(idx.shape[1]):
            tap, wc = x.index_select(dim, idx[:, c]), w[:, c].view((-1, 1) if dim == 2 else (-1,))
            y = tap * wc if y is None else y.addcmul_(tap, wc)
        x = y
    return x

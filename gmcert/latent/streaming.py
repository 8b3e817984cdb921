"""The closed-form fit over a stream of latent batches, in float64, with no ``(n, d)`` matrix (pure numpy).

A single-Gaussian head is a function of per-class sums (:class:`SufficientStatistics`) and PCA a
function of the total mean and scatter, so the fit runs in two passes over the batches:

1. the total count, mean and scatter ``(d, d)`` of the raw latents (PCA's input; skipped when
   there is no projection to fit);
2. each batch projected, and the per-class sums of the projected latents, up to the fourth order
   that Ledoit-Wolf's intensity needs (the quartic sums are not linear in the raw ones, hence the
   second pass rather than projecting raw-space sums).

Peak memory is one batch and the ``d x d`` sums, whatever ``n``. The batches come from a callable,
so the caller decides where they live (an array, a file, an encoder run once and kept in float32).
"""
from __future__ import annotations

import numpy as np

from gmcert.errors import DataError
from gmcert.latent.moments import SufficientStatistics

#: float64 values per batch (64 MB): small next to the images, large enough for BLAS to run at speed
BATCH_VALUES = 2 ** 23


def batch_rows(n_features: int) -> int:
    """Rows per batch for latents of ``n_features`` columns (at least 256)."""
    return max(256, BATCH_VALUES // max(int(n_features), 1))


def array_batches(source, y, n_features: int):
    """A callable giving ``(rows (b, n_features) float64, labels (b,))`` from any array-like ``source``
    with ``len(y)`` rows (numpy, torch on the CPU, float32 or uint8): only one batch is ever cast."""
    rows = batch_rows(n_features)

    def batches():
        for start in range(0, len(y), rows):
            Z = np.asarray(source[start:start + rows], dtype=np.float64).reshape(-1, n_features)
            if not np.all(np.isfinite(Z)):
                raise DataError("Z contains NaN or inf")
            yield Z, y[start:start + rows]
    return batches


def total_moments(batches):
    """``(n, mean (d,), scatter (d, d))`` of all rows of ``batches()`` (an iterable of ``(Z (b, d), y)``),
    summed in float64 about the first batch's mean, then moved to the overall mean exactly."""
    stats = None
    for Z, _ in batches():
        Z = np.asarray(Z, dtype=np.float64)
        if stats is None:
            stats = SufficientStatistics.empty(np.array([0]), Z.shape[1])
        stats.accumulate(Z, np.zeros(len(Z), dtype=np.int64))
    if stats is None:
        raise DataError("no latents to fit: the stream is empty")
    count, mean, scatter, _ = stats.centered()
    return int(count[0]), mean[0], scatter[0]


def class_statistics(batches, classes, transform=None) -> SufficientStatistics:
    """Per-class :class:`SufficientStatistics` of ``transform(Z)`` over ``batches()`` (``(Z, y)`` pairs);
    ``transform`` (rows -> rows, float64) defaults to none."""
    stats = None
    for Z, y in batches():
        Z = np.asarray(Z, dtype=np.float64) if transform is None else transform(Z)
        if stats is None:
            stats = SufficientStatistics.empty(np.asarray(classes), Z.shape[1])
        # one chunk per batch: the sums' reference points are the first batch's class means
        stats.accumulate(Z, y, chunk_size=max(len(Z), 1))
    if stats is None:
        raise DataError("no latents to fit: the stream is empty")
    return stats

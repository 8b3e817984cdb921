"""Streaming per-class moments of latents and covariance shrinkage (BRIEF §2). Pure numpy.

:class:`SufficientStatistics` holds per-class sums (up to fourth order) of a stream of latents,
mergeable across chunks and machines; :func:`shrunk_covariance` turns a maximum-likelihood
covariance into a shrunk one (fixed, Ledoit-Wolf or OAS intensity) using only those sums.
"""
from __future__ import annotations

import numpy as np

from gmcert.errors import DataError


def label_indices(classes, y):
    """Indices into sorted ``classes`` of labels ``y``; DataError for labels not among them."""
    y = np.asarray(y)
    try:
        pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
        unknown = classes[pos] != y
    except TypeError:  # e.g. string labels against numeric classes
        raise DataError(f"y: labels of type {y.dtype} cannot match the classes {classes.tolist()}") from None
    if unknown.any():
        raise DataError(f"y: labels {np.unique(y[unknown])[:5].tolist()} are not among the "
                        f"classes {classes.tolist()}")
    return pos


class SufficientStatistics:
    """Per-class sums of a stream of latents; ``a + b`` merges two streams (e.g. across machines).

    Sums are taken around a per-class reference point (the first chunk's class mean) so that
    second and fourth moments do not cancel catastrophically when the data sit far from the
    origin; :meth:`shifted` moves them to any other point exactly. The quartic sums make
    Ledoit-Wolf shrinkage computable from the statistics alone.

    Attributes
    ----------
    classes : ndarray (K,)
    count : ndarray (K,) float64
        Number (or total weight) of samples.
    reference : ndarray (K, d)
    sum, outer, cubic, quartic : ndarray (K, d), (K, d, d), (K, d), (K,)
        Sums of ``y``, ``y y^T``, ``||y||^2 y`` and ``||y||^4`` with ``y = z - reference``.
    """

    def __init__(self, classes, count, reference, sum, outer, cubic, quartic):
        self.classes = np.asarray(classes)
        self.count, self.reference, self.sum, self.outer, self.cubic, self.quartic = (
            np.array(x, dtype=np.float64) for x in (count, reference, sum, outer, cubic, quartic))

    @classmethod
    def empty(cls, classes, n_features):
        K, d = len(classes), int(n_features)
        return cls(classes, np.zeros(K), np.zeros((K, d)), np.zeros((K, d)), np.zeros((K, d, d)),
                   np.zeros((K, d)), np.zeros(K))

    @classmethod
    def from_data(cls, Z, y, classes=None, chunk_size=65536):
        """Statistics of validated float64 latents ``Z (n, d)`` with labels ``y (n,)``."""
        classes = np.unique(y) if classes is None else np.asarray(classes)
        return cls.empty(classes, Z.shape[1]).accumulate(Z, y, chunk_size)

    @classmethod
    def from_responsibilities(cls, Z, resp):
        """Weighted statistics of in-memory ``Z`` for each column of ``resp (n, M)`` (for EM)."""
        count = resp.sum(axis=0)
        reference = (resp.T @ Z) / np.maximum(count, 1e-300)[:, None]
        stats = cls.empty(np.arange(resp.shape[1]), Z.shape[1])
        stats.count, stats.reference = count, reference
        for j in range(resp.shape[1]):
            Y = Z - reference[j]
            sq = np.einsum("nd,nd->n", Y, Y)
            w = resp[:, j]
            stats.sum[j], stats.outer[j] = w @ Y, (Y * w[:, None]).T @ Y
            stats.cubic[j], stats.quartic[j] = (w * sq) @ Y, w @ (sq * sq)
        return stats

    def class_indices(self, y):
        """Indices into ``classes`` of labels ``y``; DataError for labels not among them."""
        return label_indices(self.classes, y)

    def accumulate(self, Z, y, chunk_size=65536):
        """Add rows of ``Z`` with labels ``y`` in chunks of ``chunk_size``; returns self."""
        idx = self.class_indices(y)
        for start in range(0, len(Z), chunk_size):
            Zc, ic = Z[start:start + chunk_size], idx[start:start + chunk_size]
            order = np.argsort(ic, kind="stable")
            ks, starts = np.unique(ic[order], return_index=True)
            for k, rows in zip(ks, np.split(order, starts[1:])):
                Yk = Zc[rows]
                if self.count[k] == 0:
                    self.reference[k] = Yk.mean(axis=0)
                Y = Yk - self.reference[k]
                sq = np.einsum("nd,nd->n", Y, Y)
                self.count[k] += len(Y)
                self.sum[k] += Y.sum(axis=0)
                self.outer[k] += Y.T @ Y
                self.cubic[k] += sq @ Y
                self.quartic[k] += sq @ sq
        return self

    def shifted(self, reference):
        """The same statistics taken around ``reference (K, d)`` (exact algebra, no data)."""
        t = self.reference - reference  # y_new = y_old + t
        n, s, O, c, q = self.count, self.sum, self.outer, self.cubic, self.quartic
        tt, st = np.einsum("kd,kd->k", t, t), np.einsum("kd,kd->k", s, t)
        trace, Ot = np.einsum("kdd->k", O), np.einsum("kde,ke->kd", O, t)
        quartic = (q + 4 * np.einsum("kd,kd->k", Ot, t) + n * tt ** 2 + 4 * np.einsum("kd,kd->k", c, t)
                   + 2 * tt * trace + 4 * tt * st)
        cubic = (c + trace[:, None] * t + 2 * Ot + 2 * st[:, None] * t + tt[:, None] * s
                 + (n * tt)[:, None] * t)
        outer = O + t[:, :, None] * s[:, None, :] + s[:, :, None] * t[:, None, :] + \
            n[:, None, None] * t[:, :, None] * t[:, None, :]
        return SufficientStatistics(self.classes, n, reference, s + n[:, None] * t, outer, cubic, quartic)

    def centered(self):
        """``(count, mean, scatter, quartic)`` about each class mean; classes with count 0 give NaN."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.reference + self.sum / self.count[:, None]
        c = self.shifted(np.where(self.count[:, None] > 0, mean, self.reference))
        return c.count, mean, c.outer, c.quartic

    def merge(self, other):
        """Statistics of both streams; classes are the union of both."""
        classes = np.union1d(self.classes, other.classes)
        out = SufficientStatistics.empty(classes, self.reference.shape[1])
        for part in (self, other):
            pos = np.searchsorted(classes, part.classes)
            fresh = out.count[pos] == 0
            ref = np.where(fresh[:, None], part.reference, out.reference[pos])
            moved = part.shifted(ref)
            out.reference[pos] = ref
            for name in ("count", "sum", "outer", "cubic", "quartic"):
                getattr(out, name)[pos] += getattr(moved, name)
        return out

    __add__ = merge


def shrunk_covariance(emp, n, quartic, shrinkage):
    """Shrink an ML covariance ``emp (d, d)`` of ``n`` samples; returns ``(cov, intensity)``.

    ``float s``: ``(1-s) emp + s I`` (QDA's ``reg_param``). ``ledoit_wolf`` / ``oas``: towards
    ``tr(emp)/d I`` with scikit-learn's intensities (``sklearn.covariance.ledoit_wolf`` / ``oas``);
    Ledoit-Wolf's needs ``quartic = sum ||z - mean||^4``.
    """
    d = emp.shape[0]
    if shrinkage is None:
        return emp, 0.0
    if not isinstance(shrinkage, str):
        return (1 - shrinkage) * emp + shrinkage * np.eye(d), float(shrinkage)
    if d == 1:
        return emp, 0.0
    mu = np.trace(emp) / d
    if shrinkage == "ledoit_wolf":
        frob2 = np.sum(emp ** 2)
        beta = (quartic / n - frob2) / (d * n)
        delta = (frob2 - 2 * mu * np.trace(emp) + d * mu ** 2) / d
        s = 0.0 if min(beta, delta) == 0 else min(beta, delta) / delta
    else:
        alpha = np.mean(emp ** 2)
        den = (n + 1) * (alpha - mu ** 2 / d)
        s = 1.0 if den == 0 else min((alpha + mu ** 2) / den, 1.0)
    return (1 - s) * emp + s * mu * np.eye(d), float(s)

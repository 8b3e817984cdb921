"""Certification results on disk and their analysis.

The TSV follows Cohen et al.'s ``certify.py`` (``idx label predict radius correct time``), so their
``analyze.py`` and anything built on it read gmcert's output unchanged; gmcert's own columns
(``samples``, ``radius_kind``, ``path``, ...) come after those six.

Rows are appended to ``<out>.partial`` as they are produced and flushed, and the file is renamed
to ``<out>`` only when the run completes, so a finished TSV is never half-written and a killed
run resumes from the rows it already has.
"""
from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import beta

from gmcert.atomic import atomic_write, save_figure
from gmcert.errors import DataError
from gmcert.results import SOUND_KINDS, Certificate

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
EXTRA_COLUMNS = ("samples", "radius_kind", "path", "latent_radius", "stop_reason")
COLUMNS = COHEN_COLUMNS + EXTRA_COLUMNS
_INT_COLUMNS = ("idx", "label", "predict", "correct", "samples")
_FLOAT_COLUMNS = ("radius", "latent_radius")


def format_seconds(seconds: float) -> str:
    """Cohen's time column: ``str(datetime.timedelta)``, e.g. ``0:00:01.234567``."""
    return str(datetime.timedelta(seconds=float(seconds)))


def parse_seconds(text: str) -> float:
    hours, minutes, seconds = text.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def certificate_row(idx: int, label: int, cert: Certificate) -> dict:
    """One TSV row. ``correct`` is 1 only for a non-abstaining correct prediction (Cohen's rule)."""
    return {
        "idx": int(idx), "label": int(label), "predict": int(cert.prediction),
        "radius": float(cert.radius), "correct": int(cert.prediction == label),
        "time": format_seconds(cert.time), "samples": int(cert.samples),
        "radius_kind": cert.radius_kind, "path": cert.path,
        "latent_radius": float(cert.latent_radius), "stop_reason": cert.stop_reason,
    }


def _format_value(column: str, value) -> str:
    if column in _FLOAT_COLUMNS:
        # repr keeps every bit, so a resumed run reproduces the same file byte for byte.
        return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else repr(float(value)))
    return str(value)


def _parse_row(header: list[str], fields: list[str]) -> dict:
    row = dict(zip(header, fields))
    for column in _INT_COLUMNS:
        if column in row:
            row[column] = int(row[column])
    for column in _FLOAT_COLUMNS:
        if column in row:
            row[column] = float(row[column])
    return row


def read_tsv(path) -> list[dict]:
    """Read a certify TSV (gmcert's or Cohen's) into a list of typed row dicts."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].split("\t")[: len(COHEN_COLUMNS)] != list(COHEN_COLUMNS):
        raise ValueError(f"{path}: not a certify TSV (expected header starting {' '.join(COHEN_COLUMNS)})")
    header = lines[0].split("\t")
    return [_parse_row(header, line.split("\t")) for line in lines[1:] if line]


class CertifyWriter:
    """Append rows to ``<path>.partial``; ``close()`` renames it to ``path``.

    With ``resume=True`` an existing ``.partial`` (from a killed run) is kept: ``done`` holds its
    row indices, and a torn last line is dropped. A finished ``path`` is never appended to.
    Nothing is created before the first row, so a run that fails before it leaves no file.
    """

    def __init__(self, path, columns=COLUMNS, resume: bool = True):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.columns = tuple(columns)
        self.rows: list[dict] = []
        self._resumed = resume and self.partial.exists()
        if self._resumed:
            self.rows = self._recover()
        self.done = {row["idx"] for row in self.rows}
        self._file = None

    def _recover(self) -> list[dict]:
        text = self.partial.read_text()
        lines = text.split("\n")
        if lines[0].split("\t") != list(self.columns):
            raise DataError(f"{self.partial}: columns differ from this run's; delete it to start over")
        complete = [line for line in lines[1:-1] if len(line.split("\t")) == len(self.columns)]
        try:
            rows = [_parse_row(list(self.columns), line.split("\t")) for line in complete]
        except ValueError as err:
            raise DataError(f"{self.partial}: unreadable row ({err}); delete it to start over") from None
        # Rewrite without any torn final line, so appends start on a clean line.
        self.partial.write_text("\n".join([lines[0], *complete]) + "\n")
        return rows

    def write(self, row: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.partial, "a" if self._resumed else "w")
            if not self._resumed:
                self._file.write("\t".join(self.columns) + "\n")
        self._file.write("\t".join(_format_value(c, row[c]) for c in self.columns) + "\n")
        self._file.flush()
        self.rows.append(row)
        self.done.add(row["idx"])

    def close(self) -> list[dict]:
        """Finish: rows sorted by idx, rewritten atomically to ``path``. Returns the rows."""
        if self._file is not None:
            self._file.close()
        self.rows.sort(key=lambda row: row["idx"])
        lines = ["\t".join(self.columns)]
        lines += ["\t".join(_format_value(c, row[c]) for c in self.columns) for row in self.rows]
        write_text_atomic(self.path, "\n".join(lines) + "\n")
        self.partial.unlink(missing_ok=True)
        return self.rows

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()  # keep .partial for resuming


def write_text_atomic(path, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _columns(rows):
    correct = np.array([row["correct"] for row in rows], dtype=bool)
    radius = np.array([row["radius"] for row in rows], dtype=np.float64)
    return correct, radius


def certified_accuracy(rows, radii) -> np.ndarray:
    """Cohen's analysis: for each r, the mean over rows of ``correct & (radius >= r)``.

    ``rows`` is a list of row dicts or a TSV path. Whatever the radius kind, rows count as they are;
    filter to sound kinds first (``sound_rows``) for a certified figure.
    """
    rows = read_tsv(rows) if isinstance(rows, (str, Path)) else rows
    correct, radius = _columns(rows)
    radii = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    if not rows:
        return np.full(radii.shape, np.nan)
    return np.array([np.mean(correct & (radius >= r)) for r in radii])


def certified_accuracy_lower_bound(rows, radii, alpha: float = 0.05) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound, at level 1-alpha, on the population certified
    accuracy at each radius, treating the rows as an i.i.d. sample of the test distribution."""
    rows = read_tsv(rows) if isinstance(rows, (str, Path)) else rows
    n = len(rows)
    hits = np.round(certified_accuracy(rows, radii) * n)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, hits, n - hits + 1)
    return np.where(hits > 0, bound, 0.0)


def average_certified_radius(rows) -> float:
    """Mean of ``radius`` over correct rows, counting wrong or abstained rows as 0 (ACR)."""
    correct, radius = _columns(rows)
    return float(np.mean(np.where(correct, radius, 0.0))) if len(rows) else math.nan


def sound_rows(rows) -> list[dict]:
    """The rows with a certified radius kind; other rows keep their prediction but radius 0."""
    return [row if row["radius_kind"] in SOUND_KINDS else {**row, "radius": 0.0} for row in rows]


def summarize(rows, radii) -> dict:
    """The JSON summary written next to every TSV."""
    radii = [float(r) for r in radii]
    sound = sound_rows(rows) if rows and "radius_kind" in rows[0] else rows
    summary = {
        "n": len(rows),
        "clean_accuracy": float(np.mean([row["correct"] for row in rows])) if rows else math.nan,
        "abstain_rate": float(np.mean([row["predict"] == -1 for row in rows])) if rows else math.nan,
        "radii": radii,
        "certified_accuracy": certified_accuracy(sound, radii).tolist(),
        "certified_accuracy_lower_95": certified_accuracy_lower_bound(sound, radii).tolist(),
        "average_certified_radius": average_certified_radius(sound),
    }
    if rows and "radius_kind" in rows[0]:
        kinds = sorted({row["radius_kind"] for row in rows})
        summary["rows_by_radius_kind"] = {k: sum(row["radius_kind"] == k for row in rows) for k in kinds}
        summary["rows_by_path"] = {
            p: sum(row["path"] == p for row in rows) for p in sorted({row["path"] for row in rows})
        }
        if "estimate" in kinds:
            # Estimates are reported, labelled, and never mixed into the certified figures.
            summary["estimated_certified_accuracy"] = certified_accuracy(rows, radii).tolist()
            summary["estimated_average_radius"] = average_certified_radius(rows)
        summary["mean_samples"] = float(np.mean([row["samples"] for row in rows]))
    return summary


def plot_certified_accuracy(curves: dict, path, title: str = "", xlabel: str = "L2 radius") -> None:
    """One PNG with a certified-accuracy curve per entry of ``curves``: ``name -> (radii, acc)``.
    Names ending in ``(estimate)`` are drawn dashed: they are not certificates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (radii, acc) in curves.items():
        ax.plot(radii, acc, "--" if "estimate" in name else "-", label=name, drawstyle="steps-post")
    ax.set(xlabel=xlabel, ylabel="certified accuracy", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)

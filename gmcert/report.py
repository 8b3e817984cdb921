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
import re
from pathlib import Path

import numpy as np

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


_SETTINGS = "#settings\t"
#: settings that identify content rather than options, named in a refusal
_CONTENT = {"inputs": "the inputs (--data/--latents, or the model's held-out rows)", "model": "the model directory",
            "mismatch": "the model's mismatch.json"}


def partial_files(path) -> list[Path]:
    """Every partial of ``path``: one process's ``.partial`` and each rank's ``.rank<r>.partial``."""
    path = Path(path)
    found = [p for p in path.parent.glob(path.name + ".*partial")
             if p.name == path.name + ".partial" or re.fullmatch(re.escape(path.name) + r"\.rank\d+\.partial", p.name)]
    return sorted(found)


def _read_partial(file: Path, columns, settings=None) -> tuple[list[str], list[dict], list[str]]:
    """(header lines, rows, the rows' lines) of one partial; complete lines only (a line being
    written, or torn by a kill, is left out). Refuses other columns or other settings."""
    lines = file.read_text().split("\n")
    if lines[0].split("\t") != list(columns):
        raise DataError(f"{file}: columns differ from this run's; delete it to start over")
    header = [lines[0]]
    if len(lines) > 2 and lines[1].startswith(_SETTINGS):
        header.append(lines[1])
        try:
            found = json.loads(lines[1][len(_SETTINGS):])
        except ValueError:
            raise DataError(f"{file}: unreadable settings line; delete it to start over") from None
        if settings is not None and found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            content = [_CONTENT[k] for k in changed if k in _CONTENT]
            raise DataError(f"{file} holds rows of a run with other settings ({', '.join(changed)})"
                            + (f": the content of {' and '.join(content)} changed since they were computed"
                               if content else "") + "; rerun with the same settings and files to resume it, "
                            "or choose another --out")
    elif settings is not None and len(lines) > 2:
        raise DataError(f"{file} records no settings, so its rows cannot be checked against this run's; delete it "
                        "or choose another --out")
    complete = [line for line in lines[len(header):-1] if len(line.split("\t")) == len(columns)]
    try:
        rows = [_parse_row(list(columns), line.split("\t")) for line in complete]
    except ValueError as err:
        raise DataError(f"{file}: unreadable row ({err}); delete it to start over") from None
    return header, rows, complete


def done_indices(path, columns=COLUMNS, settings=None) -> set:
    """Row indices already written to any partial of ``path``."""
    return {row["idx"] for file in partial_files(path) for row in _read_partial(file, columns, settings)[1]}


def merge_partials(path, columns=COLUMNS) -> list[dict]:
    """Merge every partial of ``path`` into ``path`` (atomically; rows sorted by idx, one per idx),
    delete the partials, and return the rows. Run by one process after every writer finished."""
    path = Path(path)
    rows = {}
    for file in partial_files(path):
        for row in _read_partial(file, columns)[1]:
            rows.setdefault(row["idx"], row)
    rows = [rows[k] for k in sorted(rows)]
    lines = ["\t".join(columns)]
    lines += ["\t".join(_format_value(c, row[c]) for c in columns) for row in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")
    for file in partial_files(path):
        file.unlink(missing_ok=True)
    return rows


class CertifyWriter:
    """Append rows to a partial file; ``close()`` merges every partial into ``path``.

    One process writes ``<path>.partial``; rank ``shard`` of a torchrun job writes
    ``<path>.rank<shard>.partial``. Each row is one flushed line (a torn last line is dropped on
    recovery), so a killed run loses at most the row in flight. ``done`` holds the row indices of
    *every* partial of ``path``, whichever process count wrote them, so a rerun with 1, 2 or N
    processes skips them all. ``settings`` (JSON-able) are recorded in each partial's second line and
    must match on resume: rows computed under other settings are never mixed in. Nothing is created
    before the first row, so a run that fails before it leaves no file. A finished ``path`` is never
    appended to.
    """

    def __init__(self, path, columns=COLUMNS, resume: bool = True, shard: int | None = None, settings=None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + (".partial" if shard is None else f".rank{int(shard)}.partial"))
        self.columns = tuple(columns)
        self.settings = None if settings is None else json.loads(json.dumps(settings))
        self._resumed = resume and self.partial.exists()
        if not resume:
            for other in partial_files(self.path):
                other.unlink()
        self.rows: list[dict] = self._recover() if self._resumed else []
        self.done = {row["idx"] for row in self.rows} | done_indices(self.path, self.columns, self.settings)
        self._file = None

    def _recover(self) -> list[dict]:
        """This writer's own partial, rewritten atomically without a torn final line."""
        header, rows, complete = _read_partial(self.partial, self.columns, self.settings)
        write_text_atomic(self.partial, "\n".join([*header, *complete]) + "\n")
        return rows

    def write(self, row: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.partial, "a" if self._resumed else "w")
            if not self._resumed:
                self._file.write("\t".join(self.columns) + "\n")
                if self.settings is not None:
                    self._file.write(_SETTINGS + json.dumps(self.settings, sort_keys=True) + "\n")
        self._file.write("\t".join(_format_value(c, row[c]) for c in self.columns) + "\n")
        self._file.flush()
        self.rows.append(row)
        self.done.add(row["idx"])

    def finish(self) -> None:
        """Close this writer's partial (a rank's part of a distributed run); rank 0 merges later."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        """Finish, then merge every partial of ``path`` into it (:func:`merge_partials`)."""
        self.finish()
        return merge_partials(self.path, self.columns)

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
    accuracy at each radius, treating the rows as an i.i.d. sample of the test distribution
    (:func:`gmcert.mismatch.bounds.certified_accuracy_lower`)."""
    from gmcert.mismatch.bounds import certified_accuracy_lower

    rows = read_tsv(rows) if isinstance(rows, (str, Path)) else rows
    if not rows:
        return np.zeros(np.atleast_1d(radii).shape)
    return certified_accuracy_lower(*_columns(rows), radii, alpha)[1]


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

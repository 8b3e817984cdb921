"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

The ``check_*`` functions refuse an output path before any work starts, so that a command that
cannot write its results fails at once and leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from gmcert.errors import OutputPathError


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a handle to a temporary file beside ``path``; on a clean exit it is flushed, synced
    and renamed onto ``path`` (``os.replace``), on an exception it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG atomically."""
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=dpi)


def check_file_target(path, option: str = "--out") -> None:
    """Refuse a file path that cannot be written: an existing folder, or a file among its parents."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file path")
    _check_parents(path, option)


def check_folder_target(path, option: str = "--out", owner_file: str | None = None) -> None:
    """Refuse a folder path that cannot be written: an existing file, or a file among its parents.
    With ``owner_file``, a non-empty existing folder must hold that file (the folder is then one
    of ours, safe to replace); any other folder may be someone's data and is refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is an existing file, not a folder")
    if owner_file and path.is_dir() and any(path.iterdir()) and not (path / owner_file).is_file():
        raise OutputPathError(f"{option} {path} is a folder that is not a gmcert model (no {owner_file}); "
                              "refusing to replace it: choose another path")
    _check_parents(path, option)


def _check_parents(path: Path, option: str) -> None:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: no permission to write in {parent}")


def replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

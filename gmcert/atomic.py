"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


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

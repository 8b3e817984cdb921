"""One results TSV written by every rank of a job: each rank appends its rows to its own partial,
rank 0 merges them in input order (:class:`ShardedRows`)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from gmcert.distributed.world import barrier, broadcast_json, current
from gmcert.report import COLUMNS, CertifyWriter, done_indices, merge_partials


class ShardedRows:
    """The rows of ``path``, computed by whichever ranks run (one process is the case of one rank).

    ``done``: the row indices already written by any earlier run, as rank 0 read them once every
    rank had recovered its own partial, so that all ranks split the same remaining work.
    ``close()`` returns the merged rows on rank 0 and None on the others.
    """

    def __init__(self, path, settings=None, columns=COLUMNS):
        w = current()
        self.path, self.columns, self.settings = Path(path), tuple(columns), settings
        self.writer = CertifyWriter(path, columns, shard=w.rank if w.active else None, settings=settings)
        self.done = self.writer.done
        if w.active:
            barrier(w)  # every rank has rewritten its own partial without a torn line
            seen = sorted(done_indices(path, columns, settings)) if w.main else None
            self.done = set(broadcast_json(seen, w))

    def write(self, row: dict) -> None:
        self.writer.write(row)

    def close(self):
        w = current()
        if not w.active:
            return self.writer.close()
        self.writer.finish()
        barrier(w)
        rows = merge_partials(self.path, self.columns) if w.main else None
        barrier(w)
        return rows


def model_digest(model_dir) -> str:
    """SHA-256 over a model directory's own files (``pipeline.json``, arrays, bundled encoder; not the
    reports written beside them): ranks must load the same model, and a resumed run the same one."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.parent == root):
        if path.suffix in (".npz", ".toml", ".safetensors") or path.name == "pipeline.json":
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()

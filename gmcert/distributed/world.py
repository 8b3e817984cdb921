"""The process group ``torchrun`` starts, and the collectives gmcert's commands use.

Under ``torchrun --nproc-per-node N -m gmcert ...`` every process runs the same command; torchrun
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous, and :func:`world` joins the
group: NCCL with the GPU ``cuda:LOCAL_RANK`` where CUDA is present, gloo on CPUs. Without torchrun
(or with one process) nothing is initialised and the commands run as before.

The rules every command keeps so that the result does not depend on the number of processes:

* work is split by :func:`shard` over a list every rank computed the same way (the inputs not yet
  done, as rank 0 read them and broadcast them), never by anything a rank saw alone;
* random streams are seeded from the run's seed and the input's index, never from the rank;
* rank 0 alone writes shared files (merged TSVs, summaries, model directories), after a barrier.

Collectives move tensors only (JSON text as bytes, float64 arrays): nothing is pickled, so a rank
never unpickles what another sent (``all_gather_object`` would).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass

import numpy as np

from gmcert.errors import DataError


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size``, its node-local rank and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_CURRENT = World()


def current() -> World:
    """The world of the running command (a single process outside :func:`world`)."""
    return _CURRENT


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise DataError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def choose_device(requested: str | None, local_rank: int, local_size: int, cuda_count: int) -> str:
    """The device of local rank ``local_rank``: ``cuda:LOCAL_RANK`` where GPUs are present (or asked
    for), else ``cpu``. More GPU processes on a node than GPUs is refused, never silently shared."""
    if requested is not None and not requested.startswith("cuda"):
        return requested
    if requested is None and cuda_count == 0:
        return "cpu"
    if local_size > cuda_count:
        raise DataError(f"torchrun started {local_size} processes on this node but it has {cuda_count} GPU(s): "
                        f"use --nproc-per-node {cuda_count} or fewer" if cuda_count else
                        "--device cuda asked for, but this node has no GPU")
    return f"cuda:{local_rank}"


@contextlib.contextmanager
def world(requested_device: str | None = None):
    """Join torchrun's process group for the duration (yields the :class:`World`); outside torchrun,
    a single-process world on ``requested_device``."""
    global _CURRENT
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        yield World(device=requested_device)
        return
    import torch
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    device = choose_device(requested_device, local_rank, local_size,
                           torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(minutes=int(os.environ.get("GMCERT_DIST_TIMEOUT_MIN", 60))))
    _CURRENT = World(rank, size, local_rank, local_size, device)
    try:
        yield _CURRENT
    finally:
        _CURRENT = World()
        dist.destroy_process_group()


def shard(items, w: World | None = None, block: int = 1):
    """This rank's share of ``items``: blocks of ``block`` consecutive items dealt round-robin from
    ``rank`` (deterministic). Blocks of a pass's batch size keep every batch what one process would
    have formed, so batched arithmetic gives the same bits whatever the number of ranks."""
    w = w or current()
    if not w.active:
        return items
    picks = [i for i in range(len(items)) if (i // max(int(block), 1)) % w.size == w.rank]
    return items[picks] if isinstance(items, np.ndarray) else [items[i] for i in picks]


def barrier(w: World | None = None) -> None:
    w = w or current()
    if w.active:
        import torch.distributed as dist

        dist.barrier()


def _comm_device(w: World):
    import torch

    return torch.device(w.device if w.device and w.device.startswith("cuda") else "cpu")


def _gather_bytes(w: World, data: bytes) -> list[bytes]:
    import torch
    import torch.distributed as dist

    dev = _comm_device(w)
    mine = torch.tensor(len(data), device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(mine) for _ in range(w.size)]
    dist.all_gather(sizes, mine)
    top = max(int(s) for s in sizes)
    buf = torch.zeros(top, dtype=torch.uint8, device=dev)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if data else buf[:0]
    parts = [torch.zeros_like(buf) for _ in range(w.size)]
    dist.all_gather(parts, buf)
    return [bytes(p[:int(s)].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]


def broadcast_json(value, w: World | None = None):
    """Rank 0's JSON-able ``value``, on every rank."""
    w = w or current()
    if not w.active:
        return value
    return json.loads(_gather_bytes(w, json.dumps(value).encode() if w.main else b"")[0])


def agree(fingerprint: dict, what: str, w: World | None = None) -> None:
    """Refuse to run when the ranks were not started alike (``fingerprint``: the settings and the model
    digest that every rank must share). Every rank raises; the CLI prints rank 0's message."""
    w = w or current()
    if not w.active:
        return
    prints = [json.loads(b) for b in _gather_bytes(w, json.dumps(fingerprint, sort_keys=True).encode())]
    odd = [r for r, p in enumerate(prints) if p != prints[0]]
    if odd:
        keys = sorted(k for k in set(prints[0]) | set(prints[odd[0]]) if prints[0].get(k) != prints[odd[0]].get(k))
        raise DataError(f"the ranks of this torchrun job disagree on {what}: rank(s) {odd} differ from rank 0 in "
                        f"{', '.join(keys)}; start every rank with the same command and the same model files")


def all_gather_rows(index: np.ndarray, rows: np.ndarray, total: int, w: World | None = None) -> np.ndarray:
    """Reassemble a float64 array of ``total`` rows whose rows ``index`` this rank holds (every row
    held by exactly one rank), on every rank, in row order."""
    import torch
    import torch.distributed as dist

    w = w or current()
    rows = np.ascontiguousarray(rows, dtype=np.float64).reshape(len(index), -1)
    if not w.active:
        out = np.empty((total, rows.shape[1]))
        out[np.asarray(index)] = rows
        return out
    dev = _comm_device(w)
    counts = [int(c) for c in np.frombuffer(b"".join(_gather_bytes(w, np.int64(len(index)).tobytes())), np.int64)]
    top, width = max(counts), rows.shape[1]
    packed = torch.zeros((top, width + 1), dtype=torch.float64, device=dev)
    packed[:len(index), 0] = torch.as_tensor(np.asarray(index, dtype=np.float64), device=dev)
    packed[:len(index), 1:] = torch.as_tensor(rows, device=dev)
    parts = [torch.zeros_like(packed) for _ in range(w.size)]
    dist.all_gather(parts, packed)
    out = np.full((total, width), np.nan)
    seen = np.zeros(total, dtype=bool)
    for part, count in zip(parts, counts):
        part = part[:count].cpu().numpy()
        where = part[:, 0].astype(np.int64)
        out[where], seen[where] = part[:, 1:], True
    if not seen.all():
        raise DataError(f"{int((~seen).sum())} of {total} rows reached no rank: the shards do not cover the inputs")
    return out

"""Training checkpoints: one safetensors file per run, written atomically each epoch.

The file holds the network's tensors (``model.<name>``), the optimizer's per-parameter state
(``optim.<index>.<key>``) and, in the safetensors metadata, a JSON record: the epoch reached, the
history, the run's configuration and the optimizer's hyperparameters. One file, replaced with
``os.replace``, so a kill at any moment leaves the previous epoch's checkpoint whole. Nothing is
ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from gmcert.encoders.cards import check_state_dict
from gmcert.errors import ModelFileError

FORMAT = "gmcert-train-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, record: dict) -> None:
    """Write ``model``'s and ``optimizer``'s state with ``record`` (JSON-ready) to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = tensor.detach().cpu().contiguous()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "record": record,
            "param_groups": state["param_groups"]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"gmcert": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """``(model tensors, optimizer state dict, record)``; a damaged or foreign file is a ModelFileError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = json.loads((handle.metadata() or {}).get("gmcert", "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise ModelFileError(path, "corrupt", f"{type(err).__name__}: {err}; delete it to start over") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(path, "foreign", f"not a {FORMAT} file")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(path, "newer_version", f"version {meta['format_version']}; upgrade gmcert")
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return model, {"state": state, "param_groups": meta["param_groups"]}, meta["record"]


def load_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``model`` and ``optimizer`` from ``path``; returns the record."""
    tensors, optim_state, record = read_checkpoint(path)
    check_state_dict(path, tensors, model)
    model.load_state_dict(tensors, strict=True)
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelFileError(path, "foreign", f"optimizer state does not fit: {err}") from err
    return record

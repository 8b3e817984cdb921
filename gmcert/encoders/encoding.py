"""Images -> latents, batched, on the best device, with an optional on-disk cache.

The cache key covers everything that changes the latents: the encoder card, the weights hash,
the dataset identity and the transform (input shape, resize, dtype). A cached file is an
``.npz`` written atomically (temporary file + ``os.replace``), so an interrupted run never
leaves a half-written cache that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gmcert.atomic import atomic_write
from gmcert.errors import DataError, ModelFileError

CACHE_VERSION = 1


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_encoder(encoder) -> dict:
    """What identifies an encoder's function: an :class:`~gmcert.encoders.cards.Encoder`'s card and weights
    hash, or for any other module its structure and a checksum of its parameters and buffers."""
    if hasattr(encoder, "describe"):
        return encoder.describe()
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode() + str(tensor.dtype).encode()
                      + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"module": type(encoder).__name__, "structure": repr(encoder), "state_sha256": digest.hexdigest()}


def check_same_encoder(saved, rebuilt, name) -> None:
    """A loaded model's encoder must be the one it was fitted (and its Lipschitz constant computed)
    with: a changed card (mean, std, input size, interpolation, weights file) or weights is refused."""
    rebuilt = json.loads(json.dumps(rebuilt, default=str))  # as the saved JSON has it
    if saved is None or saved == rebuilt:
        return
    changed = _differences(saved, rebuilt)
    raise ModelFileError(name, "foreign", "the encoder differs from the one this model was fitted with: "
                         + "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else ""))


def _differences(saved, rebuilt, prefix="") -> list:
    if isinstance(saved, dict) and isinstance(rebuilt, dict):
        out = []
        for key in sorted(set(saved) | set(rebuilt), key=str):
            out += _differences(saved.get(key), rebuilt.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == rebuilt else [f"{prefix[:-1]} was {saved!r}, now {rebuilt!r}"]


def latent_cache_key(encoder, dataset_identity: str, transform: dict | None = None) -> str:
    """sha256 key of (card, weights hash, dataset identity, transform).

    Parameters
    ----------
    encoder : gmcert.encoders.cards.Encoder or torch.nn.Module
        An :class:`~gmcert.encoders.cards.Encoder` contributes ``describe()``; other modules
        contribute their class name and parameter checksum.
    dataset_identity : str
        ``ImageDataset.identity``.
    transform : dict, optional
        Anything else that changes the latents (e.g. a noise level, an image subset).
    """
    payload = {"version": CACHE_VERSION, "encoder": describe_encoder(encoder), "dataset": dataset_identity,
               "transform": transform or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:40]


def read_cached(path: Path, n: int, names=("latents",)):
    """The arrays ``names`` of a cache file, each with ``n`` rows, or None (missing or unreadable:
    recompute and overwrite)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = tuple(archive[name] for name in names)
    except (OSError, KeyError, ValueError):
        return None
    return arrays if all(a.shape[:1] == (n,) for a in arrays) else None


def write_cached(path: Path, key: str, **arrays):
    """Write a cache file atomically: a killed run never leaves a half-written file to trust."""
    with atomic_write(path) as handle:
        np.savez(handle, key=np.array(key), **arrays)


def encode(encoder, images, batch_size: int = 64, device=None, cache_dir=None, cache_key: str | None = None,
           progress: bool = True) -> np.ndarray:
    """Latents of ``images`` under ``encoder``.

    Parameters
    ----------
    encoder : torch.nn.Module
        Maps ``(B, C, H, W)`` pixels to ``(B, d)`` latents; put in eval mode here.
    images : torch.Tensor or numpy.ndarray
        ``(N, C, H, W)`` float pixels in [0, 1].
    batch_size : int, default 64
    device : str or torch.device, optional
        Default: CUDA when available, else CPU. The encoder is moved there.
    cache_dir : path, optional
        With ``cache_key``, latents are read from / written to ``cache_dir/<cache_key>.npz``.
    cache_key : str, optional
        Usually :func:`latent_cache_key`.
    progress : bool, default True
        Show a tqdm bar.

    Returns
    -------
    numpy.ndarray
        ``(N, d)`` float32 latents (cast to float64 for certificates downstream).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    images = torch.from_numpy(np.asarray(images)) if not torch.is_tensor(images) else images
    if images.ndim != 4:
        raise DataError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    n = int(images.shape[0])
    path = Path(cache_dir) / f"{cache_key}.npz" if cache_dir is not None and cache_key else None
    if path is not None and path.is_file():
        cached = read_cached(path, n)
        if cached is not None and cached[0].ndim == 2:
            return cached[0]
    device = torch.device(device) if device is not None else default_device()
    encoder = encoder.eval().to(device)
    chunks = []
    with torch.inference_mode():
        # delay: no bar for an encode that takes a moment (a toy model's one-batch calls)
        for start in tqdm(range(0, n, batch_size), desc="encode", unit="batch", disable=not progress,
                          leave=False, delay=2):
            batch = images[start:start + batch_size].to(device, torch.float32, non_blocking=True)
            chunks.append(encoder(batch).float().cpu())
    latents = (torch.cat(chunks) if chunks else torch.empty(0, 0)).numpy()
    if latents.ndim != 2 or latents.shape[0] != n:
        raise DataError(f"encoder returned shape {latents.shape}, expected ({n}, d)")
    if path is not None:
        write_cached(path, cache_key, latents=latents)
    return latents


def certified_pass(bound, X, batch_size, device, cache_dir=None, dataset_identity=None, encoder=None):
    """:func:`gmcert.bounds.ball_rounding.pass_with_ball` of ``bound`` on ``X`` in chunks with
    a progress bar: ``(raw, err, A, B, rho_c, rho_r)``. With ``cache_dir`` and ``dataset_identity``
    it goes through the latent cache (keyed by ``encoder``, the module ``bound`` analyses), so
    ``gmcert certify`` after ``gmcert fit`` does not encode again."""
    names, path = ("latents", "error", "A", "B", "rho_c", "rho_r"), None
    if cache_dir is not None and dataset_identity is not None and encoder is not None:
        key = latent_cache_key(encoder, dataset_identity, {"pass": "float64 + rounding bound", "version": 2})
        path = Path(cache_dir) / f"{key}.npz"
        cached = read_cached(path, len(X), names) if path.is_file() else None
        if cached is not None:
            raw, err, A, B, rho_c, rho_r = cached
            return raw, err, A, float(B.max()), rho_c, float(rho_r.max())
    step = 4 * int(batch_size)
    from gmcert.bounds.ball_rounding import pass_with_ball

    chunks = [pass_with_ball(bound, X[i:i + step], batch_size, device)
              for i in tqdm(range(0, len(X), step), desc="certifying pass", unit="chunk", leave=False, delay=2)]
    if not chunks:
        raise DataError("no inputs to certify")
    raw, err, A, rho_c = (np.concatenate([c[i] for c in chunks]) for i in (0, 1, 2, 4))
    B, rho_r = max(c[3] for c in chunks), max(c[5] for c in chunks)
    if path is not None:
        write_cached(path, key, latents=raw, error=err, A=A, B=np.full(len(raw), B), rho_c=rho_c,
                     rho_r=np.full(len(raw), rho_r))
    return raw, err, A, B, rho_c, rho_r

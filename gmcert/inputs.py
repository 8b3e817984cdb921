"""What a ``gmcert`` command reads: latents files, image datasets and model directories.

Everything here is checked before a command writes its first byte, so that bad input costs one
line of error (a :class:`~gmcert.errors.GmcertError`) and leaves no file behind: NaN or inf,
wrong shapes, labels the model does not know, classes too small to fit, a model directory that
is missing or corrupt, a model whose recorded data has changed since it was fitted.
"""
from __future__ import annotations

import hashlib
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from gmcert.errors import DataError, GmcertError, ModelFileError


def read_latents(path) -> tuple[np.ndarray, np.ndarray]:
    """``z`` (n, d) float64 and ``y`` (n,) int64 from an npz, checked: finite, non-empty, integer labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such latents file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file, not an npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("z", "y") if key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # not a zip, a torn one, or entries that would need pickle
        raise DataError(f"{path}: not a readable npz file ({err})") from err
    if len(arrays) < 2:
        raise DataError(f"{path}: latents npz needs arrays 'z' (n, d) and 'y' (n,); missing "
                        f"{sorted({'z', 'y'} - set(arrays))}")
    z, y = arrays["z"], arrays["y"]
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise DataError(f"{path}: need z of shape (n, d) and y of shape (n,), got {z.shape} and {y.shape}")
    if len(z) == 0 or z.shape[1] == 0:
        raise DataError(f"{path}: no samples (z has shape {z.shape})")
    if z.dtype.kind not in "iuf":
        raise DataError(f"{path}: z must be numeric, got dtype {z.dtype}")
    z = z.astype(np.float64)
    bad = ~np.isfinite(z)
    if bad.any():
        raise DataError(f"{path}: z contains NaN or inf ({int(bad.sum())} value(s), first in row "
                        f"{int(np.argwhere(bad)[0, 0])})")
    return z, integer_labels(y, f"{path}: y")


def file_digest(path) -> str | None:
    """sha256 of a file's bytes (None where it does not exist): a file a run reads besides its inputs."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def integer_labels(y, name) -> np.ndarray:
    """``y`` as int64 class labels; floats must hold whole numbers (TSV rows store labels as ints)."""
    y = np.asarray(y)
    whole = y.dtype.kind in "iu" or (y.dtype.kind == "f" and np.all(np.isfinite(y) & (y == np.round(y))))
    if not whole:
        raise DataError(f"{name} must hold integer class labels, got dtype {y.dtype}"
                        + (" with fractions, NaN or inf" if y.dtype.kind == "f" else ""))
    return y.astype(np.int64)


class Inputs:
    """What a command certifies or fits on: ``x`` (images or latents), ``labels``, a cache
    ``identity`` and the ``source`` (file or dataset spec) that error messages name.
    ``channel_repeat`` is 3 where grey images were repeated to the model's 3 channels (see
    :attr:`radius_scale`)."""

    def __init__(self, x, labels, identity=None, channels=None, source="", channel_repeat=1):
        self.x, self.labels, self.identity, self.channels = x, np.asarray(labels), identity, channels
        self.source, self.channel_repeat = source, int(channel_repeat)

    @property
    def radius_scale(self) -> float:
        """What turns a radius on the model's input into one on these images: 1, or 1 / sqrt(3)
        for grey images repeated to RGB (a grey change of norm d moves the RGB input by sqrt(3) d)."""
        return 1.0 / float(np.sqrt(self.channel_repeat))

    def content_identity(self) -> str:
        """What resume settings record: the dataset's content identity, or for latents (which have
        no cache identity) the sha256 of ``x`` and ``labels``; a file overwritten at the same path
        gets another one."""
        if self.identity is not None:
            return self.identity
        digest = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        digest.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return f"{self.source}:{'x'.join(map(str, np.shape(self.x)))}:sha256={digest.hexdigest()[:32]}"

    def subset(self, index) -> "Inputs":
        index = np.asarray(index)
        identity = None
        if self.identity is not None:
            identity = f"{self.identity}[{hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest()[:12]}]"
        return Inputs(self.x[index], self.labels[index], identity, self.channels, self.source, self.channel_repeat)


def load_inputs(data: dict, channels=3, download=False, limit=None, root=None, split="train") -> Inputs:
    """Inputs named by ``data`` (``{"latents": path}`` or ``{"data": spec}``), cut to ``limit`` rows.

    A dataset named without its split (``fashion-mnist``) reads ``split``; ``root`` is where its
    files are (``--data-root``)."""
    if "latents" in data:
        inputs = Inputs(*read_latents(data["latents"]), source=str(data["latents"]))
    else:
        from gmcert.data import load_dataset, resolve_split

        data = {"data": resolve_split(data["data"], split)}
        dataset = load_dataset(data["data"], download=download, channels=channels, root=root, limit=limit)
        if dataset.labels is None:
            raise DataError(f"{data['data']}: needs labels as well as images; this file has images only")
        # Raw pixels of grayscale data stay 1-channel for the identity encoder: 3 copies would only
        # rescale every radius by sqrt(3).
        inputs = Inputs(dataset.images.numpy(), dataset.labels, dataset.identity, channels, str(data["data"]),
                        dataset.channel_repeat)
    if limit is not None:
        inputs = inputs.subset(np.arange(min(limit, len(inputs.labels))))
    return inputs


# -- fitting ----------------------------------------------------------------------------------
def fit_split(labels, test_size: float, seed: int, components_per_class: int = 1):
    """Row indices ``(train, test)``, stratified by class and sorted, once every class has the
    samples a fit needs: 2 per Gaussian component, counted in the training rows."""
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"a classifier needs at least 2 classes; the labels hold {len(classes)} "
                        f"({classes.tolist()})")
    for label, count in zip(classes, counts):
        if count < 2:
            raise DataError(f"class {label} has {count} sample; each class needs at least 2 to estimate a covariance")
    index = np.arange(len(labels))
    train, test = index, index[:0]
    if test_size > 0:
        try:
            train, test = train_test_split(index, test_size=test_size, random_state=seed, stratify=labels)
        except ValueError as err:
            raise DataError(f"--test-size {test_size} cannot hold out a split of {len(labels)} inputs stratified "
                            f"by {len(classes)} classes ({err}); pass --test-size 0 or more data") from None
        # Sorted, so that diagnose (training split) and certify (held-out split) rebuild the very
        # same subsets, and hit the latent cache.
        train, test = np.sort(train), np.sort(test)
    need = 2 * components_per_class
    train_counts = dict(zip(*np.unique(labels[train], return_counts=True)))
    for label in classes:
        if train_counts.get(label, 0) < need:
            rule = "a covariance needs 2" if need == 2 else f"--components-per-class {components_per_class} needs {need}"
            raise DataError(f"class {label} has {train_counts.get(label, 0)} training samples (after holding out "
                            f"--test-size {test_size}); {rule}")
    return train, test


# -- models -----------------------------------------------------------------------------------
def load_model(path, device=None, cache_dir=None):
    """``Pipeline.load``, with anything a damaged ``pipeline.json`` raises named as a corrupt model."""
    from gmcert.pipeline import Pipeline

    try:
        return Pipeline.load(path, device=device, cache_dir=cache_dir)
    except GmcertError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise ModelFileError(Path(path) / "pipeline.json", "corrupt", f"{type(err).__name__}: {err}") from err


def check_model_inputs(inputs: Inputs, pipeline, model) -> None:
    """Refuse inputs the model cannot take: latents for an image model (or back), another width
    or image shape, labels outside the model's classes."""
    from gmcert.pipeline import LINEAR_ENCODERS  # their input shape is the model's exactly

    shape, x = tuple(pipeline.input_shape_), inputs.x
    if pipeline.encoder_name == "none":
        if x.ndim != 2:
            raise DataError(f"model {model} takes latents of width {shape[0]}: pass --latents, not --data")
        if x.shape[1:] != shape:
            raise DataError(f"{inputs.source}: z has width {x.shape[1]}, but model {model} takes latents of "
                            f"width {shape[0]}")
    else:
        if x.ndim != 4:
            raise DataError(f"model {model} takes images (C, H, W) = {shape}: pass --data, not --latents")
        if pipeline.encoder_name in LINEAR_ENCODERS and x.shape[1:] != shape:
            raise DataError(f"{inputs.source}: images have shape {x.shape[1:]} (C, H, W), but model {model} "
                            f"takes {shape}")
        if x.shape[1] != shape[0]:
            raise DataError(f"{inputs.source}: images have {x.shape[1]} channels, model {model} takes {shape[0]}")
    classes = np.asarray(pipeline.head.classes_)
    unknown = np.setdiff1d(np.unique(inputs.labels), classes)
    if len(unknown):
        raise DataError(f"{inputs.source}: labels {unknown[:10].tolist()} are not among the model's classes "
                        f"{classes.tolist()}")


def model_inputs(args, pipeline, split: str = "test") -> tuple[Inputs, np.ndarray]:
    """The inputs a command runs ``pipeline`` on, checked against it, and their row ids (TSV ``idx``).

    ``--latents``/``--data`` when given, else the model's own held-out rows (``split="test"``) or
    training rows (``"train"``) of the data it was fitted on; either way cut to ``--limit``.
    """
    meta, channels = pipeline.metadata, pipeline.metadata.get("channels", 3)
    if args.latents or args.data:
        data = {"latents": args.latents} if args.latents else {"data": args.data}
        # a dataset with splits named bare: certify (and compare, and diagnose's sound statements)
        # read its test split, diagnose's mismatch estimates and --calibrate its training split
        inputs = load_inputs(data, channels, download=args.download, root=getattr(args, "data_root", None), split=split)
        check_model_inputs(inputs, pipeline, args.model)
        if args.limit is None:
            return inputs, np.arange(len(inputs.labels))
        index = np.arange(min(args.limit, len(inputs.labels)))
        return inputs.subset(index), index
    source = {k: meta[k] for k in ("latents", "data") if k in meta}
    if not source:
        raise DataError(f"model {args.model} does not record its data; pass --data or --latents")
    if split == "test" and not meta.get("test_index"):
        raise DataError(f"model {args.model} has no held-out split; pass --data or --latents")
    inputs = load_inputs(source, channels, download=args.download, root=getattr(args, "data_root", None))
    check_model_inputs(inputs, pipeline, args.model)
    try:
        held_out = np.asarray(meta.get("test_index", []), dtype=np.int64).ravel()
    except (TypeError, ValueError):
        raise ModelFileError(Path(args.model) / "pipeline.json", "corrupt", "test_index is not a list of rows") from None
    n = len(inputs.labels)
    if held_out.size and (held_out.min() < 0 or held_out.max() >= n):
        raise DataError(f"model {args.model}'s held-out split names row {int(held_out.max())}, but "
                        f"{inputs.source} has {n} rows: the data changed since the fit; pass --latents or --data")
    index = held_out if split == "test" else np.setdiff1d(np.arange(n), held_out)
    index = index[:args.limit]
    return inputs.subset(index), index


_POSITIVE = (lambda v: v >= 1, "a positive integer")
#: dest -> (test, what the value must be); checked before any file is read or written.
ARGUMENT_RULES = {
    "limit": _POSITIVE, "dim": _POSITIVE, "noise_copies": _POSITIVE, "components_per_class": _POSITIVE,
    "batch_size": _POSITIVE, "k": _POSITIVE, "bootstrap": _POSITIVE, "q_samples": _POSITIVE,
    "n_inputs": _POSITIVE, "max_samples": _POSITIVE, "n0": _POSITIVE,
    "n_samples": _POSITIVE, "steps": _POSITIVE, "warmup_interval": _POSITIVE,
    "audit_size": (lambda v: v >= 0, "an integer >= 0"),
    "test_size": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "noise_sigma": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "reg_covar": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "sigma": (lambda v: 0 < v < math.inf, "a positive number"),
    "alpha": (lambda v: 0 < v < 1, "in (0, 1)"),
    "target_radius": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "route_threshold": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "calibrate": (lambda v: v >= 0, "an integer >= 0"),
    "mismatch_threshold": (lambda v: math.isfinite(v), "a finite number"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "epochs": _POSITIVE, "input_size": _POSITIVE, "copies": _POSITIVE, "head_copies": _POSITIVE,
    "lr": (lambda v: 0 < v < math.inf, "a positive number"),
    "shape_weight": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "consistency_weight": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "crt_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "margin": (lambda v: 0 < v < math.inf, "a positive number"),
    "distill_weight": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
}


def check_arguments(args) -> None:
    """Refuse out-of-range option values (``ARGUMENT_RULES``) with the option's own name."""
    for dest, (test, what) in ARGUMENT_RULES.items():
        value = getattr(args, dest, None)
        if value is not None and not test(value):
            raise DataError(f"--{dest.replace('_', '-')} must be {what}, got {value}")
    if getattr(args, "device", None):
        _check_device(args.device)


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise DataError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} available)")

"""Image data sources -> float32 tensors ``(N, C, H, W)`` in [0, 1], labels, class names.

One entry point, :func:`load_dataset`, reads

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (the embedded default);
* ``"cifar10"`` / ``"cifar10:train"`` / ``"cifar10:test"``: torchvision's CIFAR-10, downloaded only
  when ``download=True`` is passed explicitly;
* a directory in ImageFolder layout (``root/<class>/<image>``), read with PIL;
* a ``.npy`` (images only) or ``.npz`` (keys ``x``/``y`` or ``images``/``labels``) array file,
  uint8 0..255 or float in [0, 1], NHWC or NCHW.

Pixel space is where certificates live (BRIEF section 4), so values are validated, never clipped.
Grayscale becomes 3 channels by default because pretrained encoders expect RGB.
Every dataset carries an ``identity`` string derived from its content, for latent-cache keys.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmcert.errors import DataError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_DATA_ROOT = os.path.join("~", ".cache", "gmcert", "data")


@dataclass
class ImageDataset:
    """Images with labels.

    Attributes
    ----------
    images : torch.Tensor
        ``(N, C, H, W)`` float32 in [0, 1].
    labels : numpy.ndarray or None
        ``(N,)`` int64 labels; None for an unlabelled ``.npy`` file.
    class_names : list of str
        Name of each class, in the order of the sorted unique labels.
    identity : str
        Content-derived identity (source, shape, sha256 of pixels and labels) for cache keys.
    """

    images: torch.Tensor
    labels: np.ndarray | None
    class_names: list
    identity: str

    def __len__(self):
        return int(self.images.shape[0])

    def subset(self, index) -> ImageDataset:
        """The rows ``index`` (array of ints or a boolean mask), with an identity that says so."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        digest = hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest()[:12]
        labels = None if self.labels is None else self.labels[index]
        return ImageDataset(self.images[torch.as_tensor(index, dtype=torch.long)], labels,
                            self.class_names, f"{self.identity}[{digest}]")


def resize_images(images: torch.Tensor, size, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize ``(N, C, h, w)`` images to ``size=(H, W)``; a no-op when they already have that size.

    Anti-aliasing is used when shrinking (bilinear/bicubic). Bicubic overshoots, so its output is
    clamped to [0, 1]; the clamp is 1-Lipschitz, so the map stays linear-then-1-Lipschitz, which
    ``gmcert.encoders.lipschitz`` relies on.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if interpolation == "nearest":
        return F.interpolate(images, size=size, mode="nearest")
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    out = F.interpolate(images, size=size, mode=interpolation, align_corners=False, antialias=shrink)
    return out.clamp(0.0, 1.0) if interpolation == "bicubic" else out


class Resize(nn.Module):
    """``resize_images`` as a module (the front of every encoder; ``gmcert.encoders.lipschitz`` knows it)."""

    def __init__(self, size, interpolation: str = "bicubic"):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.size, self.interpolation = (int(size[0]), int(size[1])), interpolation

    def forward(self, x):
        return resize_images(x, self.size, self.interpolation)

    def extra_repr(self):
        return f"size={self.size}, interpolation={self.interpolation!r}"


def _identity(source: str, images: torch.Tensor, labels) -> str:
    digest = hashlib.sha256(images.numpy().tobytes())
    if labels is not None:
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    shape = "x".join(str(s) for s in images.shape)
    return f"{source}:{shape}:sha256={digest.hexdigest()[:32]}"


def _finish(source, images, labels, class_names, image_size, interpolation, resize, channels):
    """Shared tail: channel expansion, size check or resize, validation, identity."""
    images = torch.as_tensor(images, dtype=torch.float32).contiguous()
    if channels is not None and images.shape[1] != channels:
        if images.shape[1] == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:
            raise DataError(f"{source}: images have {images.shape[1]} channels, expected {channels}")
    if image_size is not None and tuple(images.shape[-2:]) != tuple(image_size):
        if not resize:
            raise DataError(f"{source}: images are {images.shape[-2]}x{images.shape[-1]}, expected "
                            f"{image_size[0]}x{image_size[1]} (pass resize=True to resize them)")
        images = torch.cat([resize_images(b, image_size, interpolation) for b in images.split(256)])
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{source}: labels must have shape ({images.shape[0]},), got {labels.shape}")
        if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
            raise DataError(f"{source}: labels must be integers")
        if labels.dtype.kind not in "iuf":
            raise DataError(f"{source}: labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        if class_names is None:
            class_names = [str(c) for c in np.unique(labels)]
    return ImageDataset(images, labels, list(class_names or []), _identity(source, images, labels))


def _check_values(name, array):
    """uint8 -> /255; float must be finite and within [0, 1]; anything else is refused."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype.kind != "f":
        raise DataError(f"{name}: images must be uint8 (0..255) or float in [0, 1], got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise DataError(f"{name}: images contain NaN or inf")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise DataError(f"{name}: float pixel values must lie in [0, 1], found [{low:g}, {high:g}] "
                        "(store 0..255 data as uint8, or divide by 255)")
    return array.astype(np.float32)


def _to_nchw(name, array):
    """Accept (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; refuse ambiguity."""
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataError(f"{name}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                        f"got {array.shape}")
    first, last = array.shape[1] in (1, 3), array.shape[-1] in (1, 3)
    if first and last:
        raise DataError(f"{name}: cannot tell channels-first from channels-last in shape {array.shape}")
    if last:
        array = np.moveaxis(array, -1, 1)
    elif not first:
        raise DataError(f"{name}: images must have 1 or 3 channels (first or last axis), got shape {array.shape}")
    if array.shape[0] == 0 or min(array.shape[2:]) < 1:
        raise DataError(f"{name}: no images or empty image size in shape {array.shape}")
    return np.ascontiguousarray(array)


def _load_arrays(path: Path):
    if path.suffix == ".npy":
        images, labels, names = np.load(path, allow_pickle=False), None, None
    else:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            pair = next(((x, y) for x, y in (("x", "y"), ("images", "labels")) if x in keys), None)
            if pair is None:
                raise DataError(f"{path}: .npz must hold keys x/y or images/labels, found {sorted(keys)}")
            images = archive[pair[0]]
            labels = archive[pair[1]] if pair[1] in keys else None
            names = [str(n) for n in archive["class_names"]] if "class_names" in keys else None
    images = _check_values(str(path), _to_nchw(str(path), images))
    return images, labels, names


def _load_image_folder(root: Path, image_size, interpolation):
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(f, k) for k, d in enumerate(class_dirs) for f in sorted(d.iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataError(f"{root}: empty image folder (expected {root}/<class>/<image>{IMAGE_EXTENSIONS[0]}, ...)")
    images, labels = [], []
    for path, label in files:
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"{path}: unreadable image file ({err})") from err
        tensor = torch.from_numpy(rgb.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)[None]
        if image_size is not None:
            tensor = resize_images(tensor, image_size, interpolation)
        images.append(tensor)
        labels.append(label)
    sizes = sorted({tuple(t.shape[-2:]) for t in images})
    if len(sizes) > 1:
        raise DataError(f"{root}: images have different sizes ({sizes[0]} and {sizes[-1]}, ...); "
                        "pass image_size to resize them all")
    return torch.cat(images), np.asarray(labels), [d.name for d in class_dirs]


def _load_cifar10(split, root, download):
    from torchvision.datasets import CIFAR10

    root = Path(os.path.expanduser(root or DEFAULT_DATA_ROOT))
    if not download and not (root / CIFAR10.base_folder).is_dir():
        raise DataError(f"CIFAR-10 not found under {root}: pass download=True (CLI: --download) to fetch it, "
                        f"or put the extracted {CIFAR10.base_folder}/ folder there (--data-root)")
    try:
        data = CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"CIFAR-10 under {root}: {err}") from err
    return data.data.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0), np.asarray(data.targets), \
        list(data.classes)


def load_dataset(spec: str, *, image_size=None, interpolation: str = "bicubic", resize: bool = True,
                 channels: int | None = 3, download: bool = False, root=None) -> ImageDataset:
    """Load a dataset by spec.

    Parameters
    ----------
    spec : str
        ``"digits"``, ``"cifar10"`` (``"cifar10:train"``, ``"cifar10:test"``), an ImageFolder
        directory, or a ``.npy`` / ``.npz`` file.
    image_size : (int, int) or None, default None
        Wanted ``(H, W)``. None keeps the native size (an ImageFolder with mixed sizes then fails).
        Encoders resize to their card's size themselves, so native size is usually what you want.
    interpolation : {"bicubic", "bilinear", "nearest"}, default "bicubic"
        Used when resizing.
    resize : bool, default True
        When False, images whose size differs from ``image_size`` raise DataError instead.
    channels : int or None, default 3
        Wanted channel count; grayscale is repeated to 3 channels. None keeps the native count.
    download : bool, default False
        Allow torchvision to download CIFAR-10. Nothing is ever downloaded otherwise.
    root : str or None
        CIFAR-10 location (default ``~/.cache/gmcert/data``).

    Returns
    -------
    ImageDataset
    """
    if image_size is not None:
        image_size = (int(image_size[-2]), int(image_size[-1]))
    args = (image_size, interpolation, resize, channels)
    if spec == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None]
        names = [str(k) for k in digits.target_names]
        return _finish("digits", images, digits.target, names, *args)
    if spec.split(":")[0] == "cifar10":
        split = spec.split(":", 1)[1] if ":" in spec else "train"
        if split not in ("train", "test"):
            raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
        images, labels, names = _load_cifar10(split, root, download)
        return _finish(f"cifar10:{split}", images, labels, names, *args)
    path = Path(spec)
    if path.is_dir():
        images, labels, names = _load_image_folder(path, image_size, interpolation)
        return _finish(f"folder:{path.resolve()}", images, labels, names, *args)
    if path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise DataError(f"{path}: no such array file")
        images, labels, names = _load_arrays(path)
        return _finish(f"arrays:{path.name}", images, labels, names, *args)
    raise DataError(f"dataset spec {spec!r} is not 'digits', 'cifar10[:train|:test]', a directory, "
                    "or a .npy/.npz file")

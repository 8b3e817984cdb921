"""Images as gmcert holds them: ``ImageDataset`` (float32 ``(N, C, H, W)`` in [0, 1], labels, class
names, a content identity), the resize every encoder starts with, and the checks every source's
arrays pass (values in [0, 1] never clipped, channel layout, labels).

Pixel space is where certificates live (BRIEF section 4), so values are validated, never clipped.
Grayscale becomes 3 channels by default because pretrained encoders expect RGB.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmcert.errors import DataError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


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
    channel_repeat : int
        3 where grey images were repeated to 3 channels, else 1. The repeat has norm sqrt(3): a
        change of norm d to the grey image changes the RGB input by sqrt(3) d, so a radius
        certified on the RGB input covers grey changes below radius / sqrt(3) only.
    """

    images: torch.Tensor
    labels: np.ndarray | None
    class_names: list
    identity: str
    channel_repeat: int = 1

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
                            self.class_names, f"{self.identity}[{digest}]", self.channel_repeat)


def resize_images(images: torch.Tensor, size, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize ``(N, C, h, w)`` images to ``size=(H, W)``; a no-op when they already have that size.

    Anti-aliasing is used when shrinking (bilinear/bicubic). Bicubic overshoots, so its output is
    clamped to [0, 1]; the clamp is 1-Lipschitz, so the map stays linear-then-1-Lipschitz, which
    ``gmcert.bounds.lipschitz`` relies on.
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
    """``resize_images`` as a module (the front of every encoder; ``gmcert.bounds.lipschitz`` knows it)."""

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
    digest = hashlib.sha256(images.numpy().data)  # the buffer itself (contiguous): no bytes copy
    if labels is not None:
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    shape = "x".join(str(s) for s in images.shape)
    return f"{source}:{shape}:sha256={digest.hexdigest()[:32]}"


def _finish(source, images, labels, class_names, image_size, interpolation, resize, channels):
    """Shared tail: channel expansion, size check or resize, validation, identity."""
    images, repeat = torch.as_tensor(images, dtype=torch.float32).contiguous(), 1
    if channels is not None and images.shape[1] != channels:
        if images.shape[1] == 1 and channels == 3:
            images, repeat = images.expand(-1, 3, -1, -1).contiguous(), 3
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
    return ImageDataset(images, labels, list(class_names or []), _identity(source, images, labels), repeat)


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

"""Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 grey images of 10 clothing classes, read in place
from the IDX files that torchvision's ``FashionMNIST`` and Debian's ``dataset-fashion-mnist``
package hold. Nothing is ever copied or written beside them.

Where the files are looked for, in order:

1. ``root`` (CLI ``--data-root``), else ``$GMCERT_DATA``: the named folder itself, or torchvision's
   layout under it (``<root>/FashionMNIST/raw``). A folder named there is the only place searched,
   so that an error names the place the user pointed at;
2. with neither: ``~/.cache/gmcert/data`` in torchvision's layout (what ``--download`` fills), then
   the Debian package's install location, ``/usr/share/datasets/fashion-mnist``.

Files may be plain IDX (read by torchvision's ``read_image_file`` / ``read_label_file``) or gzipped
as shipped (decompressed in memory and parsed by the same header rules).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from gmcert.errors import DataError

#: split -> (images file, labels file), without the optional ``.gz``
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
ENV = "GMCERT_DATA"
DEFAULT_ROOT = Path("~", ".cache", "gmcert", "data")
#: where ``apt-get install dataset-fashion-mnist`` puts the gzipped IDX files
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: rows converted to float32 at a time: the uint8 file is the only full-size array besides the result
BATCH = 8192


def search_dirs(root=None) -> list:
    """The folders searched for the IDX files, in order (see the module docstring)."""
    named = root or os.environ.get(ENV) or None
    base = Path(os.path.expanduser(str(named or DEFAULT_ROOT)))
    dirs = [base, base / "FashionMNIST" / "raw"]
    return dirs if named else dirs + [SYSTEM_DIR]


def _find(name, dirs):
    for folder in dirs:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_files(split: str, root=None) -> tuple:
    """``(images, labels)`` paths of ``split``; DataError in one line saying how to get them."""
    dirs = search_dirs(root)
    paths = [_find(name, dirs) for name in FILES[split]]
    if None in paths:
        missing = FILES[split][paths.index(None)]
        raise DataError(f"Fashion-MNIST {split} split not found ({missing}[.gz] in {', '.join(map(str, dirs))}): "
                        "install it with `apt-get install dataset-fashion-mnist`, point --data-root (or "
                        f"${ENV}) at the IDX files, or pass --download where a network exists")
    return tuple(paths)


def _parse_idx(data: bytes, path) -> np.ndarray:
    """An IDX buffer as a uint8 array, by torchvision's header rules (big-endian magic: 0, 0,
    type 0x08 = uint8, number of dimensions; then one big-endian uint32 per dimension)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 3:
        raise DataError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()})")
    nd = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd))
    offset = 4 + 4 * nd
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says {shape}, the file holds {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def read_idx(path, kind: str) -> np.ndarray:
    """``kind`` "images" (n, H, W) or "labels" (n,) as uint8, from a plain or gzipped IDX file."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                array = _parse_idx(fh.read(), path)
        else:
            from torchvision.datasets.mnist import read_image_file, read_label_file

            array = (read_image_file if kind == "images" else read_label_file)(str(path)).numpy()
    except (OSError, EOFError, ValueError, TypeError, AssertionError, RuntimeError) as err:
        raise DataError(f"{path}: unreadable IDX file ({type(err).__name__}: {err})") from err
    if array.ndim != (3 if kind == "images" else 1):
        raise DataError(f"{path}: expected {kind} of {'3' if kind == 'images' else '1'} dimensions, got {array.shape}")
    return array


def download(root=None) -> None:
    """Fetch the files with torchvision into ``<root>/FashionMNIST/raw`` (only on ``--download``)."""
    from torchvision.datasets import FashionMNIST

    base = os.path.expanduser(str(root or os.environ.get(ENV) or DEFAULT_ROOT))
    try:
        for train in (True, False):
            FashionMNIST(base, train=train, download=True)
    except (OSError, RuntimeError) as err:  # no network, a torn download
        raise DataError(f"Fashion-MNIST download into {base} failed ({type(err).__name__}: {err}); "
                        "without a network, `apt-get install dataset-fashion-mnist`") from err


def load_fashion_mnist(split: str = "train", root=None, download_missing: bool = False, limit=None):
    """``(images (n, 1, 28, 28) float32 in [0, 1], labels (n,) int64, class names)`` of ``split``.

    ``limit`` keeps the first ``limit`` rows; the rest are never converted. Conversion runs in
    batches of :data:`BATCH` rows, so no float64 (or second float32) copy of the split exists.
    """
    if split not in FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    try:
        image_path, label_path = find_files(split, root)
    except DataError:
        if not download_missing:
            raise
        download(root)
        image_path, label_path = find_files(split, root)
    pixels, labels = read_idx(image_path, "images"), read_idx(label_path, "labels")
    if len(pixels) != len(labels):
        raise DataError(f"{image_path} holds {len(pixels)} images but {label_path} {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataError(f"{label_path}: label {int(labels.max())} is not one of Fashion-MNIST's {len(CLASSES)} classes")
    n = len(pixels) if limit is None else min(int(limit), len(pixels))
    images = torch.empty((n, 1, *pixels.shape[1:]), dtype=torch.float32)
    for start in range(0, n, BATCH):
        batch = np.asarray(pixels[start:start + BATCH][: n - start], dtype=np.float32)
        images[start:start + len(batch), 0] = torch.from_numpy(batch).div_(255.0)
    return images, labels[:n].astype(np.int64), list(CLASSES)

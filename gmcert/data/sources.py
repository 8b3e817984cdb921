"""The sources :func:`load_dataset` reads, each into an :class:`~gmcert.data.images.ImageDataset`:

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (the embedded default);
* ``"fashion-mnist"`` / ``"fashion-mnist:train"`` / ``"fashion-mnist:test"``: Zalando's 28x28
  Fashion-MNIST, read in place from its IDX files (:mod:`gmcert.data.fashion_mnist`);
* ``"cifar10"`` / ``"cifar10:train"`` / ``"cifar10:test"``: torchvision's CIFAR-10, downloaded only
  when ``download=True`` is passed explicitly;
* a directory in ImageFolder layout (``root/<class>/<image>``), read with PIL;
* a ``.npy`` (images only) or ``.npz`` (keys ``x``/``y`` or ``images``/``labels``) array file,
  uint8 0..255 or float in [0, 1], NHWC or NCHW.

Every dataset carries an ``identity`` string derived from its content, for latent-cache keys.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gmcert.data.images import ImageDataset, _check_values, _finish, _to_nchw, resize_images
from gmcert.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_DATA_ROOT = os.path.join("~", ".cache", "gmcert", "data")


#: what ``--data`` and ``--data-root`` take, for every command's help (here, beside the loaders,
#: so that ``gmcert.train.command`` need not import the ``gmcert.cli`` package that imports it)
DATA_HELP = ("digits | fashion-mnist[:train|:test] (bare: fit and train read train, certify test) | "
             "cifar10[:train|:test] | ImageFolder dir | .npy/.npz images")
DATA_ROOT_HELP = ("where Fashion-MNIST's IDX files (or CIFAR-10) are (default: $GMCERT_DATA, ~/.cache/gmcert/data, "
                  "then /usr/share/datasets/fashion-mnist from `apt-get install dataset-fashion-mnist`)")


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


#: dataset specs with named splits; a bare name takes the split a command asks for (:func:`resolve_split`)
SPLIT_DATASETS = ("fashion-mnist",)


def resolve_split(spec, split: str = "train"):
    """``"fashion-mnist"`` -> ``"fashion-mnist:<split>"``; any other spec (or one with a split) as given.

    Fitting and training read the training split; certifying, the test split."""
    return f"{spec}:{split}" if spec in SPLIT_DATASETS else spec


def load_dataset(spec: str, *, image_size=None, interpolation: str = "bicubic", resize: bool = True,
                 channels: int | None = 3, download: bool = False, root=None, limit=None) -> ImageDataset:
    """Load a dataset by spec.

    Parameters
    ----------
    spec : str
        ``"digits"``, ``"fashion-mnist"`` (``"fashion-mnist:train"`` (the bare name's split),
        ``"fashion-mnist:test"``), ``"cifar10"`` (``"cifar10:train"``, ``"cifar10:test"``), an
        ImageFolder directory, or a ``.npy`` / ``.npz`` file.
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
        Allow torchvision to download CIFAR-10 or Fashion-MNIST. Nothing is ever downloaded otherwise.
    root : str or None
        Where CIFAR-10 (default ``~/.cache/gmcert/data``) or Fashion-MNIST's IDX files are
        (default: ``$GMCERT_DATA``, ``~/.cache/gmcert/data``, the Debian package's location; see
        :mod:`gmcert.data.fashion_mnist`).
    limit : int or None
        Fashion-MNIST only: decode the first ``limit`` rows alone (callers still cut other sources).

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
    if str(spec).split(":")[0] == "fashion-mnist":
        from gmcert.data.fashion_mnist import load_fashion_mnist

        split = spec.split(":", 1)[1] if ":" in spec else "train"
        images, labels, names = load_fashion_mnist(split, root, download, limit)
        rows = "" if limit is None else f"[:{len(labels)}]"
        return _finish(f"fashion-mnist:{split}{rows}", images, labels, names, *args)
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
    raise DataError(f"dataset spec {spec!r} is not 'digits', 'fashion-mnist[:train|:test]', 'cifar10[:train|:test]', a directory, "
                    "or a .npy/.npz file")

"""Image data: sources -> float32 tensors ``(N, C, H, W)`` in [0, 1], labels, class names.

* :mod:`gmcert.data.images`: ``ImageDataset``, ``resize_images`` / ``Resize`` (the front of every
  encoder), the checks every source's arrays pass;
* :mod:`gmcert.data.sources`: :func:`load_dataset`, one entry point for every spec (digits,
  Fashion-MNIST, CIFAR-10, ImageFolder, array files);
* :mod:`gmcert.data.fashion_mnist`: Fashion-MNIST's IDX files, found and read in place.
"""
from gmcert.data.images import INTERPOLATIONS, ImageDataset, Resize, resize_images
from gmcert.data.sources import DEFAULT_DATA_ROOT, IMAGE_EXTENSIONS, load_dataset, resolve_split

__all__ = ["DEFAULT_DATA_ROOT", "IMAGE_EXTENSIONS", "INTERPOLATIONS", "ImageDataset", "Resize", "load_dataset",
           "resize_images", "resolve_split"]

"""Data sources: digits, arrays, ImageFolder, CIFAR-10 guard, and the errors for bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from gmcert.data import Resize, load_dataset, resize_images
from gmcert.errors import DataError


def test_digits_scaled_to_unit_range_with_three_channels():
    ds = load_dataset("digits")
    assert ds.images.shape == (1797, 3, 8, 8) and ds.images.dtype == torch.float32
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])
    assert ds.class_names == [str(k) for k in range(10)] and set(ds.labels) == set(range(10))
    gray = load_dataset("digits", channels=None)
    assert gray.images.shape == (1797, 1, 8, 8)
    assert load_dataset("digits").identity == ds.identity != gray.identity
    part = ds.subset(np.arange(10))
    assert len(part) == 10 and part.identity != ds.identity and np.array_equal(part.labels, ds.labels[:10])


def test_npz_layouts_and_dtypes_agree(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nhwc.npz", x=pixels, y=labels)
    np.savez(tmp_path / "nchw.npz", images=pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255, labels=labels)
    a, b = load_dataset(str(tmp_path / "nhwc.npz")), load_dataset(str(tmp_path / "nchw.npz"))
    assert a.images.shape == (6, 3, 5, 7)
    torch.testing.assert_close(a.images, b.images)
    assert np.array_equal(a.labels, labels) and a.class_names == ["0", "1", "2"]
    np.save(tmp_path / "gray.npy", pixels[..., 0])
    unlabelled = load_dataset(str(tmp_path / "gray.npy"))
    assert unlabelled.labels is None and unlabelled.images.shape == (6, 3, 5, 7)
    resized = load_dataset(str(tmp_path / "nhwc.npz"), image_size=(10, 14))
    assert resized.images.shape == (6, 3, 10, 14) and 0.0 <= float(resized.images.min()) <= 1.0


@pytest.mark.parametrize("images, match", [
    (np.zeros((4, 5, 5, 4), np.uint8), "1 or 3 channels"),
    (np.zeros((4, 3, 5, 3), np.uint8), "cannot tell"),
    (np.zeros((4, 25), np.uint8), "must have shape"),
    (np.full((4, 5, 5), np.nan, np.float32), "NaN"),
    (np.full((4, 5, 5), 2.0, np.float32), r"\[0, 1\]"),
    (np.zeros((4, 5, 5), np.int64), "uint8"),
])
def test_bad_arrays_are_refused(tmp_path, images, match):
    np.savez(tmp_path / "bad.npz", x=images, y=np.zeros(4))
    with pytest.raises(DataError, match=match):
        load_dataset(str(tmp_path / "bad.npz"))


def test_wrong_size_labels_and_keys(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 6, 6), np.uint8), y=np.zeros(3))
    with pytest.raises(DataError, match="labels must have shape"):
        load_dataset(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 6, 6), np.uint8), y=np.zeros(4))
    with pytest.raises(DataError, match="6x6, expected 8x8"):
        load_dataset(str(tmp_path / "b.npz"), image_size=(8, 8), resize=False)
    np.savez(tmp_path / "c.npz", pixels=np.zeros((4, 6, 6), np.uint8))
    with pytest.raises(DataError, match="keys"):
        load_dataset(str(tmp_path / "c.npz"))
    with pytest.raises(DataError, match="no such"):
        load_dataset(str(tmp_path / "absent.npz"))
    with pytest.raises(DataError, match="dataset spec"):
        load_dataset("mnist")


def _folder(root, sizes=((6, 5), (6, 5))):
    for label, (cls, mode) in enumerate([("cat", "RGB"), ("dog", "L")]):
        (root / cls).mkdir(parents=True)
        for i, size in enumerate(sizes):
            value = 40 * (label + 1) + i
            Image.new(mode, size, color=value if mode == "L" else (value, 0, 255)).save(root / cls / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    ds = load_dataset(str(_folder(tmp_path / "f")))
    assert ds.images.shape == (4, 3, 5, 6) and ds.class_names == ["cat", "dog"]
    assert list(ds.labels) == [0, 0, 1, 1]
    assert torch.allclose(ds.images[0, :, 0, 0], torch.tensor([40, 0, 255]) / 255.0)
    assert torch.allclose(ds.images[2, :, 0, 0], torch.full((3,), 80 / 255.0))  # grayscale -> 3 equal channels


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="empty image folder"):
        load_dataset(str(tmp_path / "empty"))
    root = _folder(tmp_path / "broken")
    (root / "dog" / "9.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"9\.png: unreadable image"):
        load_dataset(str(root))
    mixed = _folder(tmp_path / "mixed", sizes=((6, 5), (8, 8)))
    with pytest.raises(DataError, match="different sizes"):
        load_dataset(str(mixed))
    assert load_dataset(str(mixed), image_size=(7, 7)).images.shape == (4, 3, 7, 7)


def test_cifar10_is_never_downloaded_implicitly(tmp_path):
    with pytest.raises(DataError, match="download"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match="split"):
        load_dataset("cifar10:valid", root=str(tmp_path))


def test_resize_keeps_unit_range_and_is_identity_at_size():
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, ::2] = 1.0  # stripes make bicubic overshoot, which the clamp must remove
    y = resize_images(x, (19, 23), "bicubic")
    assert y.shape == (2, 3, 19, 23) and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert resize_images(x, (8, 8)) is x and Resize((8, 8))(x) is x
    with pytest.raises(DataError, match="interpolation"):
        Resize((4, 4), "lanczos")

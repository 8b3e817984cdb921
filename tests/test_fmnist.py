"""Fashion-MNIST (issue 26): IDX files read in place (no copy, no download), ``--limit``, the
missing-file error, the splits per command; the data's native size for gmcert's own networks and
a printed, recorded resize where a card fixes another; ``gmcert train --test-size 0``; LeNet.

The IDX files are written by the tests themselves (small, seeded), so nothing here depends on
the ``dataset-fashion-mnist`` package; one test uses the package where it is installed.
"""
import gzip
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from gmcert.cli import main
from gmcert.data import Resize, load_dataset
from gmcert.data.fashion_mnist import FILES, SYSTEM_DIR
from gmcert.encoders.cards import CARDS_DIR
from gmcert.bounds.lipschitz import _SLACK as SLACK
from gmcert.encoders.resizing import resize_norm
from gmcert.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    """``gmcert_cnn``'s card building the 6k-parameter ``gmcert_cnn_tiny``."""
    text = (CARDS_DIR / "gmcert_cnn.toml").read_text()
    for key, value in (("name", '"gmcert_cnn_tiny"'), ("architecture", '"gmcert_cnn_tiny"'), ("feature_dim", "32")):
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} = ") else line for line in text.splitlines())
    path = tmp_path_factory.mktemp("card") / "tiny.toml"
    path.write_text(text + "\n")
    return path


# -- --test-size 0 ---------------------------------------------------------------------------
@pytest.mark.parametrize("student", ["standard", "lipschitz"])
def test_train_with_test_size_0_trains_on_every_row(tmp_path, tiny_card, capsys, student):
    out = tmp_path / "model"
    encoder = ["--encoder", str(tiny_card)] if student == "standard" else []
    assert main(["train", "--student", student, *encoder, "--epochs", "1", "--limit", "80", "--test-size", "0",
                 "--batch-size", "40", "--out", str(out)]) == 0
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["test_index"] == []
    record = json.loads((out / "train.json").read_text())
    assert record["train_rows"] == 80
    printed = capsys.readouterr().out
    assert "no held-out split" in printed and "nan" not in printed


# -- IDX files the tests write ---------------------------------------------------------------
N_TRAIN, N_TEST = 120, 40


def _idx_bytes(array: np.ndarray) -> bytes:
    """uint8 IDX: magic 0 0 0x08 ndim, big-endian uint32 dimensions, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _fmnist_arrays(split):
    """28x28 uint8 images, one smooth template per class plus jitter; test labels in another order."""
    rng = np.random.default_rng(5)
    templates = np.stack([gaussian_filter(rng.normal(size=(28, 28)), 3.0, mode="wrap") for _ in range(10)])
    templates = 0.5 + 0.4 * templates / np.abs(templates).max(axis=(1, 2), keepdims=True)
    n = N_TRAIN if split == "train" else N_TEST
    y = np.arange(n) % 10 if split == "train" else (3 * np.arange(n) + 1) % 10
    noise = 0.05 * np.random.default_rng(1 if split == "train" else 2).normal(size=(n, 28, 28))
    return np.round(255 * np.clip(templates[y] + noise, 0, 1)).astype(np.uint8), y.astype(np.uint8)


def write_fmnist(folder, gz=True):
    """Both splits' four IDX files in ``folder`` (gzipped as the Debian package ships them, or plain)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (image_name, label_name) in FILES.items():
        images, labels = _fmnist_arrays(split)
        for name, array in ((image_name, images), (label_name, labels)):
            data = _idx_bytes(array)
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as fh:
                    fh.write(data)
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    return write_fmnist(tmp_path_factory.mktemp("fmnist"))


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_is_read_in_place_with_its_limit(tmp_path, gz):
    root = write_fmnist(tmp_path / "files", gz=gz)
    before = _listing(tmp_path)
    for split in ("train", "test"):
        images, labels = _fmnist_arrays(split)
        data = load_dataset(f"fashion-mnist:{split}", root=str(root), channels=None)
        assert data.images.dtype == torch.float32 and tuple(data.images.shape) == (len(labels), 1, 28, 28)
        np.testing.assert_array_equal(data.images.numpy()[:, 0], images.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(data.labels, labels)
        assert data.class_names[0] == "T-shirt/top" and len(data.class_names) == 10
        first = load_dataset(f"fashion-mnist:{split}", root=str(root), channels=None, limit=7)
        assert len(first) == 7
        np.testing.assert_array_equal(first.images.numpy(), data.images.numpy()[:7])
        np.testing.assert_array_equal(first.labels, labels[:7])
    assert _listing(tmp_path) == before  # nothing decompressed or copied beside the files


def test_root_order_data_root_then_env_then_torchvision_layout_then_the_package(tmp_path, monkeypatch):
    import gmcert.data.fashion_mnist as fm

    flat, env, layout, system = (tmp_path / name for name in ("flat", "env", "layout", "system"))
    write_fmnist(flat)
    write_fmnist(env / "FashionMNIST" / "raw", gz=False)  # torchvision's layout under the env's folder
    write_fmnist(layout / "FashionMNIST" / "raw")
    write_fmnist(system)
    monkeypatch.setattr(fm, "SYSTEM_DIR", system)
    monkeypatch.setattr(fm, "DEFAULT_ROOT", tmp_path / "empty-default")
    monkeypatch.setenv(fm.ENV, str(env))
    assert fm.find_files("test", str(flat))[0].parent == flat               # --data-root wins
    assert fm.find_files("test")[0].parent == env / "FashionMNIST" / "raw"   # then $GMCERT_DATA
    monkeypatch.delenv(fm.ENV)
    assert fm.find_files("test")[0].parent == system                         # then the package's place
    monkeypatch.setattr(fm, "DEFAULT_ROOT", layout)
    assert fm.find_files("test")[0].parent == layout / "FashionMNIST" / "raw"  # the default root first
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fm.find_files("train", str(tmp_path / "nowhere"))  # a named root is the only place searched


def test_missing_files_say_how_to_get_them_exit_2_and_write_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _listing(tmp_path)
    for argv in (["fit", "--data", "fashion-mnist", "--encoder", "identity", "--out", str(tmp_path / "m")],
                 ["train", "--data", "fashion-mnist:test", "--epochs", "1", "--out", str(tmp_path / "t")]):
        capsys.readouterr()
        assert main([*argv, "--data-root", str(empty)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # train's header aside
        assert len(err) == 1, err
        err = err[0]
        assert "apt-get install dataset-fashion-mnist" in err and "--download" in err
        assert _listing(tmp_path) == before


def test_fit_reads_the_training_split_and_certify_the_test_split(tmp_path, fmnist_root, capsys):
    model, root = tmp_path / "raw", ["--data-root", str(fmnist_root)]
    assert main(["fit", "--data", "fashion-mnist", *root, "--encoder", "identity", "--dim", "16", "--limit", "100",
                 "--cache-dir", "", "--out", str(model)]) == 0
    meta = json.loads((model / "pipeline.json").read_text())
    assert meta["data"] == "fashion-mnist:train" and len(meta["test_index"]) == 25  # held out of the 100
    assert max(meta["test_index"]) < 100 and meta["resize"] is None
    out = tmp_path / "test.tsv"
    assert main(["certify", "--model", str(model), "--data", "fashion-mnist", *root, "--limit", "30",
                 "--cache-dir", "", "--out", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert [int(r[1]) for r in rows] == _fmnist_arrays("test")[1][:30].tolist()  # the test split's labels
    held = tmp_path / "held.tsv"
    assert main(["certify", "--model", str(model), *root, "--cache-dir", "", "--out", str(held)]) == 0
    assert [int(line.split("\t")[0]) for line in held.read_text().splitlines()[1:]] == meta["test_index"]


# -- native size and the resize --------------------------------------------------------------
def test_train_keeps_the_native_size_and_prints_and_records_any_resize(tmp_path, fmnist_root, tiny_card, capsys):
    common = ["train", "--data", "fashion-mnist", "--data-root", str(fmnist_root), "--encoder", str(tiny_card),
              "--epochs", "1", "--head-copies", "1", "--dim", "8"]
    native = tmp_path / "native"
    assert main([*common, "--out", str(native)]) == 0
    assert "native size (28x28 px): no resize" in capsys.readouterr().out
    meta = json.loads((native / "pipeline.json").read_text())
    assert meta["input_shape"] == [1, 28, 28] and meta["resize"] is None
    assert "input_size = [1, 28, 28]" in (native / "encoder.toml").read_text()

    small = tmp_path / "small"
    assert main([*common, "--input-size", "12", "--out", str(small)]) == 0
    printed = capsys.readouterr()
    assert "resizing the data 28x28 -> 12x12 px" in printed.out + printed.err
    recorded = json.loads((small / "pipeline.json").read_text())["resize"]
    assert recorded == json.loads((small / "train.json").read_text())["resize"]
    assert recorded["from"] == [28, 28] and recorded["to"] == [12, 12]
    # the norm is the resize's operator norm: the largest singular value of the (linear) bilinear map
    with torch.no_grad():
        matrix = Resize((12, 12), "bilinear")(torch.eye(784, dtype=torch.float64).view(784, 1, 28, 28)).flatten(1)
    top = float(torch.linalg.matrix_norm(matrix, ord=2))
    assert top <= recorded["norm"] <= top * SLACK * (1 + 1e-9)
    assert recorded["norm"] == pytest.approx(resize_norm((28, 28), (12, 12), "bilinear"))
    out = tmp_path / "c.tsv"
    assert main(["certify", "--model", str(small), "--cache-dir", "", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["resize"] == recorded


def test_fit_prints_and_records_a_cards_resize(tmp_path, fmnist_root, tiny_card, capsys):
    model = tmp_path / "m"
    assert main(["fit", "--data", "fashion-mnist", "--data-root", str(fmnist_root), "--encoder", str(tiny_card),
                 "--no-pretrained", "--dim", "8", "--limit", "100", "--cache-dir", "", "--out", str(model)]) == 0
    assert "resizing the data 28x28 -> 8x8 px" in capsys.readouterr().err
    recorded = json.loads((model / "pipeline.json").read_text())["resize"]
    assert recorded["to"] == [8, 8] and 0 < recorded["norm"] < 1  # shrinking (anti-aliased) contracts


# -- LeNet -----------------------------------------------------------------------------------
def test_lenet_is_the_published_architecture_and_its_bound_is_sound():
    from gmcert.encoders.cards import load_encoder
    from gmcert.bounds.lipschitz import lipschitz_constant

    encoder = load_encoder("lenet", pretrained=False).double()
    shapes = [tuple(m.weight.shape) for m in encoder.network.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert shapes == [(6, 1, 5, 5), (16, 6, 5, 5), (120, 256), (84, 120)]
    assert encoder.output_dim == 84
    L, kind = lipschitz_constant(encoder, "bound", input_shape=(1, 28, 28))
    assert kind == "bound" and 0 < L < float("inf")
    rng = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=rng, dtype=torch.float64)
    delta = 1e-3 * torch.randn(64, 1, 28, 28, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        ratio = (encoder(x + delta) - encoder(x)).norm(dim=1) / delta.flatten(1).norm(dim=1)
    assert float(ratio.max()) <= L


def test_train_arch_lenet_trains_and_certifies(tmp_path, fmnist_root, capsys):
    model = tmp_path / "lenet"
    assert main(["train", "--arch", "lenet", "--data", "fashion-mnist", "--data-root", str(fmnist_root),
                 "--epochs", "1", "--head-copies", "1", "--dim", "8", "--out", str(model)]) == 0
    assert "lenet-trained, input size 28 px" in capsys.readouterr().out
    out = tmp_path / "c.tsv"
    assert main(["certify", "--model", str(model), "--data", "fashion-mnist", "--data-root", str(fmnist_root),
                 "--limit", "10", "--cache-dir", "", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["rows_by_radius_kind"] == {"bound": 10} and summary["resize"] is None
    assert main(["train", "--arch", "lenet", "--encoder", "gmcert_cnn", "--out", str(tmp_path / "x")]) == 2


def test_lenet_resizes_small_images_up_to_its_card_and_says_so(tmp_path, capsys):
    model = tmp_path / "digits"
    assert main(["train", "--arch", "lenet", "--limit", "100", "--epochs", "1", "--head-copies", "1", "--dim", "8",
                 "--out", str(model)]) == 0
    printed = capsys.readouterr()
    assert "resizing the data 8x8 -> 28x28 px" in printed.out
    assert json.loads((model / "pipeline.json").read_text())["resize"]["norm"] > 1  # upsampling expands


# -- the package, where it is installed ------------------------------------------------------
@pytest.mark.skipif(not (SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_the_installed_package_trains_and_certifies(tmp_path, monkeypatch, tiny_card):
    import gmcert.data.fashion_mnist as fm

    monkeypatch.delenv(fm.ENV, raising=False)
    monkeypatch.setattr(fm, "DEFAULT_ROOT", tmp_path / "no-default")  # so the package's files are read
    model = tmp_path / "m"
    assert main(["train", "--data", "fashion-mnist", "--encoder", str(tiny_card), "--limit", "300", "--epochs", "1",
                 "--head-copies", "1", "--dim", "8", "--out", str(model)]) == 0
    out = tmp_path / "c.tsv"
    assert main(["certify", "--model", str(model), "--data", "fashion-mnist:test", "--limit", "20",
                 "--cache-dir", "", "--out", str(out)]) == 0
    labels = [int(line.split("\t")[1]) for line in out.read_text().splitlines()[1:]]
    assert labels == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5, 7, 3, 4, 1, 2, 4, 8, 0]  # Fashion-MNIST's first test labels

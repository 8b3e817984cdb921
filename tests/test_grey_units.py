"""Grey images on a 3-channel model: the loader repeats them to RGB, a map of norm sqrt(3) (a grey
change of norm d moves the RGB input by sqrt(3) d). A radius on the RGB input therefore covers grey
changes below radius / sqrt(3) only, and ``certify`` and ``compare`` report radii on the images the
user gave. The check: the same images given already in RGB (no repeat) get radii sqrt(3) times
larger, row for row, and the same predictions."""
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from gmcert.cli import main
from gmcert.encoders.cards import CARDS_DIR
from gmcert.report import read_tsv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    """A random-init 3-channel tiny CNN with its head fitted on 300 digits (repeated to RGB)."""
    root = tmp_path_factory.mktemp("grey")
    text = (CARDS_DIR / "gmcert_cnn.toml").read_text()
    for old, new in (("input_size = [1, 8, 8]", "input_size = [3, 8, 8]"), ("mean = [0.5]", "mean = [0.5, 0.5, 0.5]"),
                     ("std = [0.5]", "std = [0.5, 0.5, 0.5]"), ('architecture = "gmcert_cnn"', 'architecture = "gmcert_cnn_tiny"'),
                     ("feature_dim = 128", "feature_dim = 32")):
        assert old in text
        text = text.replace(old, new)
    (root / "rgb.toml").write_text(text)
    assert main(["fit", "--data", "digits", "--encoder", str(root / "rgb.toml"), "--no-pretrained", "--limit", "300",
                 "--dim", "16", "--out", str(root / "m")]) == 0
    return root


def test_radii_are_on_the_grey_images(rgb_model, capsys):
    model = rgb_model / "m"
    assert main(["certify", "--model", str(model), "--out", str(rgb_model / "grey.tsv")]) == 0
    assert "divided by sqrt(3)" in capsys.readouterr().out
    held = json.loads((model / "pipeline.json").read_text())["test_index"]
    digits = load_digits()
    x = np.repeat(digits.images[held][:, None] / 16.0, 3, axis=1).astype(np.float32)
    np.savez(rgb_model / "rgb.npz", x=x, y=digits.target[held])
    assert main(["certify", "--model", str(model), "--data", str(rgb_model / "rgb.npz"),
                 "--out", str(rgb_model / "rgb.tsv")]) == 0
    grey, rgb = read_tsv(rgb_model / "grey.tsv"), read_tsv(rgb_model / "rgb.tsv")
    assert len(grey) == len(rgb) == len(held)
    g = np.array([r["radius"] for r in grey])
    c = np.array([r["radius"] for r in rgb])
    assert [r["predict"] for r in grey] == [r["predict"] for r in rgb]
    assert np.count_nonzero(c > 0) > len(c) // 2
    np.testing.assert_allclose(g * np.sqrt(3), c, rtol=1e-12)
    summary = json.loads((rgb_model / "grey.json").read_text())
    assert summary["radius_scale"] == pytest.approx(1 / np.sqrt(3))


def test_compare_reports_grey_radii_too(rgb_model):
    """Every method's rows pass through the same scaling; the closed form's are deterministic (a
    smoother's draws are seeded by the row index, which the RGB file numbers from 0)."""
    model = rgb_model / "m"
    common = ["--n-inputs", "6", "--methods", "gm-exact"]
    assert main(["compare", "--model", str(model), "--out", str(rgb_model / "cg"), *common]) == 0
    assert main(["compare", "--model", str(model), "--data", str(rgb_model / "rgb.npz"),
                 "--out", str(rgb_model / "cr"), *common]) == 0
    g = np.array([r["radius"] for r in read_tsv(rgb_model / "cg" / "gm-exact.tsv")])
    c = np.array([r["radius"] for r in read_tsv(rgb_model / "cr" / "gm-exact.tsv")])
    assert np.any(c > 0)
    np.testing.assert_allclose(g * np.sqrt(3), c, rtol=1e-12)

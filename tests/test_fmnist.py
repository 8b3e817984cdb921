"""Fashion-MNIST (issue 26): IDX files read in place (no copy, no download), ``--limit``, the
missing-file error, the splits per command; the data's native size for gmcert's own networks and
a printed, recorded resize where a card fixes another; ``gmcert train --test-size 0``; LeNet.

The IDX files are written by the tests themselves (small, seeded), so nothing here depends on
the ``dataset-fashion-mnist`` package; one test uses the package where it is installed.
"""
import json

import pytest

from gmcert.cli import main
from gmcert.encoders.cards import CARDS_DIR

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

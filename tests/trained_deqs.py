"""Digits DEQs trained once per test module (gmcert_deq, gmcert_cdeq), and model-directory copies."""
import shutil

import numpy as np

from gmcert.inputs import load_inputs
from gmcert.train import TrainConfig, train_model


def train_digits_deq(tmp_path_factory, encoder: str, epochs: int) -> dict:
    """``{"pipeline", "record", "x", "y"}``: the trained model and its held-out digits."""
    out = tmp_path_factory.mktemp(encoder) / "model"
    pipeline, record = train_model(out, encoder=encoder, config=TrainConfig(epochs=epochs, seed=0), device="cpu",
                                   progress=False)
    inputs = load_inputs({"data": "digits"}, channels=1)
    test = np.asarray(pipeline.metadata["test_index"])
    return {"pipeline": pipeline, "record": record, "x": inputs.x[test], "y": inputs.labels[test]}


def model_copy(trained: dict, tmp_path, name: str = "model"):
    """A copy of the trained model's directory, for commands that write into it."""
    model = tmp_path / name
    shutil.copytree(trained["pipeline"].bundled_files["encoder.toml"].parent, model)
    return model

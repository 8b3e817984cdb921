"""Model files: exact round trips, atomic writes, and every ModelFileError reason."""
import json
import os
import zipfile

import numpy as np
import pytest

from gmcert.latent import modelio
from gmcert.errors import ModelFileError
from gmcert.latent.mixture import GaussianMixtureClassifier


def _fitted(labels=(3, 5, 7), **params):
    rng = np.random.default_rng(0)
    Z = np.concatenate([rng.normal(size=(80, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5) * 3
                        for _ in labels])
    y = np.repeat(np.asarray(labels), 80)
    return GaussianMixtureClassifier(**params).fit(Z, y), Z, y


@pytest.mark.parametrize("labels,params", [
    ((3, 5, 7), {}), (("cat", "dog", "emu"), {"covariance_type": "diag", "shrinkage": "oas"}),
    ((0, 1, 2), {"covariance_type": "tied", "priors": [0.2, 0.3, 0.5]}),
    ((1, 2, 4), {"n_components_per_class": 2, "random_state": 3, "shrinkage": 0.1})])
def test_save_load_round_trip_is_exact(tmp_path, labels, params):
    clf, Z, y = _fitted(labels, **params)
    path = tmp_path / "head.npz"
    clf.save(path)
    back = GaussianMixtureClassifier.load(path)
    assert back.get_params() == clf.get_params()
    np.testing.assert_array_equal(back.classes_, clf.classes_)
    np.testing.assert_array_equal(back.class_scores(Z), clf.class_scores(Z))
    np.testing.assert_array_equal(back.predict(Z), clf.predict(Z))
    for method in ("exact", "closed_form"):
        for a, b in zip(back.certify(Z, method), clf.certify(Z, method)):
            np.testing.assert_array_equal(a, b)
    for name in ("count", "reference", "sum", "outer", "cubic", "quartic"):
        np.testing.assert_array_equal(getattr(back.statistics_, name), getattr(clf.statistics_, name))
    assert os.listdir(tmp_path) == ["head.npz"]  # the temporary file is gone


def test_loaded_model_keeps_learning(tmp_path):
    clf, Z, y = _fitted()
    clf.save(tmp_path / "m.npz")
    back = GaussianMixtureClassifier.load(tmp_path / "m.npz").partial_fit(Z, y)
    twice = GaussianMixtureClassifier().fit(np.r_[Z, Z], np.r_[y, y])
    np.testing.assert_allclose(back.covariances_, twice.covariances_, rtol=1e-10)


def test_generic_arrays_with_metadata(tmp_path):
    path = tmp_path / "pipe.npz"
    arrays = {"projection": np.arange(12.0).reshape(3, 4), "names": np.array(["a", "bb"]), "flag": np.array(True)}
    modelio.save_arrays(path, {"format": "gmcert-pipeline", "format_version": 2, "encoder": "resnet18"}, arrays)
    meta, back = modelio.load_arrays(path, "gmcert-pipeline", max_version=2)
    assert meta["encoder"] == "resnet18" and meta["format_version"] == 2 and "gmcert_version" in meta
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(back[name], value)
        assert back[name].dtype == value.dtype
    with pytest.raises(ValueError, match="cannot be stored"):
        modelio.save_arrays(path, {"format": "x", "format_version": 1}, {"o": np.array([{}], dtype=object)})
    with pytest.raises(ValueError, match="format_version"):
        modelio.save_arrays(path, {"format": "x"}, {})
    assert modelio.load_arrays(path, "gmcert-pipeline", max_version=2)[1].keys() == arrays.keys()  # intact
    assert os.listdir(tmp_path) == ["pipe.npz"]


def _reason(path):
    with pytest.raises(ModelFileError) as info:
        GaussianMixtureClassifier.load(path)
    assert info.value.path == str(path) and str(path) in str(info.value)
    return info.value.reason


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.npz") == "missing"


def test_corrupt_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(os.urandom(2000).replace(b"PK", b"QK"))
    assert _reason(junk) == "corrupt"
    clf, _, _ = _fitted()
    flipped = tmp_path / "flipped.npz"
    clf.save(flipped)
    data = bytearray(flipped.read_bytes())
    with zipfile.ZipFile(flipped) as archive:  # damage a member's bytes, not the zip structure
        info = archive.getinfo("component_means_.npy")
    start = info.header_offset + 30 + len(info.filename) + 200
    data[start:start + 8] = bytes(8 - i for i in range(8))
    flipped.write_bytes(bytes(data))
    assert _reason(flipped) == "corrupt"


def test_truncated_files(tmp_path):
    clf, _, _ = _fitted()
    path = tmp_path / "cut.npz"
    clf.save(path)
    whole = path.read_bytes()
    for size in (len(whole) // 2, len(whole) - 10, 100):
        path.write_bytes(whole[:size])
        assert _reason(path) == "truncated"
    path.write_bytes(b"")
    assert _reason(path) == "truncated"


def test_foreign_files(tmp_path):
    np.savez(tmp_path / "plain.npz", weights=np.ones(3))
    assert _reason(tmp_path / "plain.npz") == "foreign"
    np.save(tmp_path / "array.npy", np.ones(3))
    assert _reason(tmp_path / "array.npy") == "foreign"
    (tmp_path / "config.json").write_text(json.dumps({"format": "gmcert-model"}))
    assert _reason(tmp_path / "config.json") == "foreign"
    modelio.save_arrays(tmp_path / "pipe.npz", {"format": "gmcert-pipeline", "format_version": 1}, {})
    assert _reason(tmp_path / "pipe.npz") == "foreign"
    assert _reason(tmp_path) == "foreign"  # a folder


def test_newer_version(tmp_path):
    path = tmp_path / "future.npz"
    modelio.save_arrays(path, {"format": "gmcert-model", "format_version": 99}, {})
    with pytest.raises(ModelFileError, match="upgrade gmcert") as info:
        GaussianMixtureClassifier.load(path)
    assert info.value.reason == "newer_version"


def test_pickled_or_tampered_contents_are_corrupt_and_never_unpickled(tmp_path):
    clf, _, _ = _fitted()
    path = tmp_path / "m.npz"
    clf.save(path)
    _, arrays = modelio.load_arrays(path, "gmcert-model")
    with np.load(path) as npz:
        meta = npz["__meta__"]
    np.savez(tmp_path / "evil.npz", __meta__=meta, **dict(arrays, priors_=np.array([object()], dtype=object)))
    assert _reason(tmp_path / "evil.npz") == "corrupt"
    np.savez(tmp_path / "short.npz", __meta__=meta, **dict(arrays, priors_=arrays["priors_"][:2]))
    assert _reason(tmp_path / "short.npz") == "corrupt"
    np.savez(tmp_path / "badjson.npz", __meta__=np.frombuffer(b"{not json", dtype=np.uint8))
    assert _reason(tmp_path / "badjson.npz") == "corrupt"


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    clf, Z, _ = _fitted()
    path = tmp_path / "m.npz"
    clf.save(path)
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        clf.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]

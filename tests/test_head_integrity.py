"""A crafted head.npz is refused on load (issue 25, part 1).

Each test writes a head whose arrays disagree with each other in one way that an earlier gmcert
accepted, and checks that loading names the file and the field. The first one is the review's
attack: a ``tied`` head whose class-0 precision was scaled by 3 (still SPD, log-determinant fixed
to match) got ``exact`` hyperplane radii that flipped at half their length.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from gmcert.errors import ModelFileError
from gmcert.latent import modelio
from gmcert.latent.mixture import GaussianMixtureClassifier


def _fitted(covariance_type="tied", n_components_per_class=1, d=6):
    rng = np.random.default_rng(1)
    Z = np.concatenate([rng.normal(size=(120, d)) @ rng.normal(size=(d, d)) + 4 * rng.normal(size=d)
                        for _ in range(3)])
    y = np.repeat([0, 1, 2], 120)
    clf = GaussianMixtureClassifier(covariance_type=covariance_type, shrinkage="ledoit_wolf",
                                    n_components_per_class=n_components_per_class, random_state=0)
    return clf.fit(Z, y), Z


def _tamper(path, change):
    """Rewrite ``path``'s arrays through ``change(arrays)``, keeping a valid container and manifest."""
    meta, arrays = modelio.load_arrays(path, modelio.MODEL_FORMAT)
    arrays = {name: np.array(value) for name, value in arrays.items()}
    change(arrays)
    meta = {k: v for k, v in meta.items() if k not in ("arrays", "gmcert_version")}
    modelio.save_arrays(path, meta, arrays)


def _refused(path, field):
    with pytest.raises(ModelFileError) as info:
        GaussianMixtureClassifier.load(path)
    assert str(path) in str(info.value) and field in str(info.value), str(info.value)
    assert info.value.reason == "corrupt"


def test_scaled_tied_precision_with_matching_log_det_is_refused(tmp_path):
    clf, Z = _fitted("tied")
    path = tmp_path / "head.npz"
    clf.save(path)

    def scale_class_0(arrays):
        arrays["component_precisions_"][0] *= 3.0
        arrays["component_log_dets_"][0] -= arrays["component_precisions_"].shape[1] * np.log(3.0)

    _tamper(path, scale_class_0)
    _refused(path, "component_precisions_")


def test_non_symmetric_full_precision_is_refused(tmp_path):
    clf, _ = _fitted("full")
    path = tmp_path / "head.npz"
    clf.save(path)
    _tamper(path, lambda a: a["component_precisions_"][1].__setitem__((0, 1), a["component_precisions_"][1][0, 1] + 0.5))
    _refused(path, "component_precisions_")


def test_off_diagonal_precision_in_a_diag_head_is_refused(tmp_path):
    clf, _ = _fitted("diag")
    path = tmp_path / "head.npz"
    clf.save(path)

    def off_diagonal(arrays):
        arrays["component_precisions_"][2][0, 1] = arrays["component_precisions_"][2][1, 0] = 0.1

    _tamper(path, off_diagonal)
    _refused(path, "component_precisions_")


def test_covariance_that_is_not_positive_definite_is_refused(tmp_path):
    clf, _ = _fitted("full")
    path = tmp_path / "head.npz"
    clf.save(path)

    def indefinite(arrays):
        arrays["covariances_"][0] -= 2 * np.linalg.eigvalsh(arrays["covariances_"][0])[-1] * np.eye(6)

    _tamper(path, indefinite)
    _refused(path, "covariances_")


def test_covariance_layout_must_match_the_covariance_type(tmp_path):
    clf, _ = _fitted("diag")
    path = tmp_path / "head.npz"
    clf.save(path)

    def full_layout(arrays):
        arrays["covariances_"] = arrays["covariances_"][:, :, None] * np.eye(6)

    _tamper(path, full_layout)
    _refused(path, "covariances_")


@pytest.mark.parametrize("field,change", [
    ("component_log_dets_", lambda a: a["component_log_dets_"].__setitem__(0, a["component_log_dets_"][0] + 1.0)),
    ("component_log_weights_", lambda a: a["component_log_weights_"].__setitem__(0, 0.0)),
    ("priors_", lambda a: a["priors_"].__setitem__(0, a["priors_"][0] * 2)),
    ("component_means_", lambda a: a["component_means_"].__setitem__((0, 0), np.nan)),
    ("means_", lambda a: a["means_"].__setitem__((0, 0), a["means_"][0, 0] + 1)),
    ("component_class_", lambda a: a["component_class_"].__setitem__(0, 7)),
])
def test_every_array_a_certificate_trusts_is_checked(tmp_path, field, change):
    clf, _ = _fitted("full", n_components_per_class=2)
    path = tmp_path / "head.npz"
    clf.save(path)
    _tamper(path, change)
    _refused(path, field)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("components", [1, 2])
def test_honest_heads_load_unchanged(tmp_path, covariance_type, components):
    clf, Z = _fitted(covariance_type, components)
    clf.save(tmp_path / "head.npz")
    back = GaussianMixtureClassifier.load(tmp_path / "head.npz")
    np.testing.assert_array_equal(back.component_precisions_, clf.component_precisions_)
    np.testing.assert_array_equal(back.component_log_dets_, clf.component_log_dets_)
    np.testing.assert_array_equal(back.certify(Z)[1], clf.certify(Z)[1])


def test_cli_refuses_the_crafted_tied_head_in_one_line(tmp_path):
    model, out = tmp_path / "model", tmp_path / "cert.tsv"
    fit = subprocess.run([sys.executable, "-m", "gmcert", "fit", "--encoder", "identity", "--dim", "16",
                          "--covariance-type", "tied", "--out", str(model), "--cache-dir", ""],
                         capture_output=True, text=True)
    assert fit.returncode == 0, fit.stderr

    def scale_class_0(arrays):
        arrays["component_precisions_"][0] *= 3.0
        arrays["component_log_dets_"][0] -= 16 * np.log(3.0)

    _tamper(model / "head.npz", scale_class_0)
    run = subprocess.run([sys.executable, "-m", "gmcert", "certify", "--model", str(model), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "head.npz" in lines[0] and "component_precisions_" in lines[0], run.stderr
    assert not out.exists() and not list(tmp_path.glob("cert.tsv*"))
    assert json.loads((model / "pipeline.json").read_text())["encoder"] == "identity"

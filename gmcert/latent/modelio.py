"""gmcert's model files: one ``.npz`` (never pickled) whose ``__meta__`` entry is a JSON blob.

A model file may come from someone else, so loading names what is wrong with it:
``missing``, ``corrupt`` (not a zip, bad CRC, unreadable metadata or arrays), ``truncated``
(a zip cut short: its end-of-archive record is gone), ``foreign`` (a valid file that is not this
gmcert format) or ``newer_version`` -> :class:`gmcert.errors.ModelFileError`.

The metadata holds ``format`` (e.g. ``gmcert-model``), ``format_version`` (int),
``gmcert_version`` and ``arrays`` (name -> dtype and shape, checked on load), plus whatever the
caller adds. Writes are atomic: a temporary file in the same folder, then ``os.replace``.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib

import numpy as np

from gmcert.atomic import atomic_write
from gmcert.errors import ModelFileError
from gmcert.latent.integrity import HeadInconsistency, checked_head_arrays

META_KEY = "__meta__"
MODEL_FORMAT = "gmcert-model"
MODEL_FORMAT_VERSION = 1
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _gmcert_version():
    from gmcert import __version__

    return __version__


def save_arrays(path, meta, arrays):
    """Write ``arrays`` and JSON ``meta`` to one ``.npz`` file, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination, written exactly as given (no suffix is added).
    meta : dict
        JSON-serialisable; must hold ``format`` (str) and ``format_version`` (int).
    arrays : dict of str -> array_like
        Numeric, boolean or unicode arrays (object arrays would need pickle and are refused).
    """
    if not isinstance(meta.get("format"), str) or not isinstance(meta.get("format_version"), int):
        raise ValueError("meta must hold 'format' (str) and 'format_version' (int)")
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in arrays.items():
        if name.startswith("__") or value.dtype.kind not in "biufcU":
            raise ValueError(f"array {name!r}: dtype {value.dtype} or name cannot be stored without pickle")
    manifest = {name: {"dtype": value.dtype.str, "shape": list(value.shape)} for name, value in arrays.items()}
    full = dict(meta, gmcert_version=_gmcert_version(), arrays=manifest)
    blob = np.frombuffer(json.dumps(full, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    with atomic_write(path) as handle:
        np.savez(handle, **{META_KEY: blob}, **arrays)


def load_arrays(path, expected_format, max_version=MODEL_FORMAT_VERSION):
    """Read a file written by :func:`save_arrays`, checking what it is first.

    Parameters
    ----------
    path : str or os.PathLike
    expected_format : str
        The ``format`` the caller can read; anything else is ``foreign``.
    max_version : int
        Highest ``format_version`` the caller can read; above it, ``newer_version``.

    Returns
    -------
    meta : dict
    arrays : dict of str -> ndarray

    Raises
    ------
    ModelFileError
        With ``reason`` one of missing, corrupt, truncated, foreign, newer_version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(path, "missing", "no such file")
    if os.path.isdir(path):
        raise ModelFileError(path, "foreign", "a folder, not a gmcert model file")
    _check_container(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if META_KEY not in npz.files:
                raise ModelFileError(path, "foreign", "an .npz file without gmcert metadata")
            meta = json.loads(npz[META_KEY].tobytes().decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != expected_format:
                found = meta.get("format") if isinstance(meta, dict) else None
                raise ModelFileError(path, "foreign", f"format {found!r}, expected {expected_format!r}")
            version = meta.get("format_version")
            if not isinstance(version, int) or isinstance(version, bool):
                raise ModelFileError(path, "corrupt", f"format_version {version!r} is not an integer")
            if version > max_version:
                raise ModelFileError(path, "newer_version", f"format version {version}; this gmcert "
                                     f"({_gmcert_version()}) reads up to {max_version}: upgrade gmcert")
            arrays = {name: npz[name] for name in npz.files if name != META_KEY}
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, UnicodeDecodeError,
            KeyError) as exc:
        raise ModelFileError(path, "corrupt", f"{type(exc).__name__}: {exc}") from exc
    _check_manifest(path, meta, arrays)
    return meta, arrays


def _check_container(path):
    """Tell a zip cut short (truncated) from bytes that never were one (corrupt or foreign)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not head:
        raise ModelFileError(path, "truncated", "the file is empty")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise ModelFileError(path, "truncated", "the zip archive's end record is missing")
        return
    if head.startswith(b"\x93NUMPY"):
        raise ModelFileError(path, "foreign", "a single .npy array, not a gmcert model file")
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except (ValueError, UnicodeDecodeError):
        raise ModelFileError(path, "corrupt", "not a zip/.npz archive") from None
    raise ModelFileError(path, "foreign", "a JSON file, not a gmcert model file")


def _check_manifest(path, meta, arrays):
    manifest = meta.get("arrays")
    if not isinstance(manifest, dict) or set(manifest) != set(arrays):
        raise ModelFileError(path, "corrupt", "the arrays do not match the metadata's manifest")
    for name, spec in manifest.items():
        value = arrays[name]
        if not isinstance(spec, dict) or spec.get("dtype") != value.dtype.str or \
                spec.get("shape") != list(value.shape):
            raise ModelFileError(path, "corrupt", f"array {name!r} does not match its manifest entry")


# ------------------------------------------------------------------ the classifier's layout
_CLASSIFIER_ARRAYS = ("classes_", "priors_", "means_", "covariances_", "shrinkage_", "component_class_",
                      "component_log_weights_", "component_means_", "component_precisions_",
                      "component_log_dets_")
_STATISTICS_ARRAYS = ("count", "reference", "sum", "outer", "cubic", "quartic")


def save_classifier(clf, path):
    """Write a fitted :class:`~gmcert.latent.mixture.GaussianMixtureClassifier` (see its ``save``)."""
    params = clf.get_params()
    if params["priors"] is not None:
        params["priors"] = np.asarray(params["priors"], dtype=float).tolist()
    if not (params["random_state"] is None or isinstance(params["random_state"], (int, np.integer))):
        params["random_state"] = None  # a generator object has no faithful JSON form
    elif params["random_state"] is not None:
        params["random_state"] = int(params["random_state"])
    arrays = {name: getattr(clf, name) for name in _CLASSIFIER_ARRAYS}
    classes = np.asarray(arrays["classes_"])
    if classes.dtype.kind == "O":
        if not all(isinstance(c, str) for c in classes):
            raise ValueError("class labels must be numbers or strings to be saved without pickle")
        arrays["classes_"] = classes.astype(str)
    stats = getattr(clf, "statistics_", None)
    if stats is not None:
        arrays.update({"statistics_" + name: getattr(stats, name) for name in _STATISTICS_ARRAYS})
    meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
            "estimator": type(clf).__name__, "params": params,
            "n_features_in": int(clf.n_features_in_),
            "feature_names_in": [str(f) for f in getattr(clf, "feature_names_in_", [])] or None}
    save_arrays(path, meta, arrays)


def load_classifier(cls, path):
    """Read a classifier written by :func:`save_classifier` into a new instance of ``cls``."""
    from gmcert.latent.moments import SufficientStatistics

    meta, arrays = load_arrays(path, MODEL_FORMAT)
    if meta.get("estimator") != cls.__name__:
        raise ModelFileError(path, "foreign", f"holds a {meta.get('estimator')!r}, not a {cls.__name__}")
    missing = [name for name in _CLASSIFIER_ARRAYS if name not in arrays]
    if missing or not isinstance(meta.get("params"), dict):
        raise ModelFileError(path, "corrupt", f"missing entries: {missing or ['params']}")
    try:
        clf = cls(**meta["params"])
        for name in _CLASSIFIER_ARRAYS:
            setattr(clf, name, arrays[name])
        # The certificates and the torch head trust these: recomputed from the covariances, the
        # one source of truth, and refused where the stored ones disagree (gmcert.latent.integrity).
        derived = checked_head_arrays(clf.covariance_type, int(meta["n_features_in"]),
                                      {name: arrays[name] for name in _CLASSIFIER_ARRAYS})
        for name, value in derived.items():
            setattr(clf, name, value)
        clf.n_features_in_ = int(meta["n_features_in"])
        if meta.get("feature_names_in"):
            clf.feature_names_in_ = np.asarray(meta["feature_names_in"], dtype=object)
        if "statistics_count" in arrays:
            clf.statistics_ = SufficientStatistics(
                clf.classes_, *(arrays["statistics_" + name] for name in _STATISTICS_ARRAYS))
        clf._build_geometry()
    except HeadInconsistency as exc:
        raise ModelFileError(path, "corrupt", str(exc)) from None
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ModelFileError(path, "corrupt", f"inconsistent contents: {exc}") from exc
    return clf

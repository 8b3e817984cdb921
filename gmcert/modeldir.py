"""A pipeline's model directory: ``pipeline.json``, ``head.npz``, ``projection.npz`` and a trained
encoder's bundled card and weights, written atomically, read back without unpickling, versioned."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from gmcert.atomic import replace_directory
from gmcert.errors import DataError, ModelFileError
from gmcert.latent.mixture import GaussianMixtureClassifier

#: encoders that are no network: latents as given (``none``) or pixels flattened (``identity``)
LINEAR_ENCODERS = ("none", "identity")

FORMAT = "gmcert-pipeline"
FORMAT_VERSION = 1


def save_pipeline(pipeline, path) -> None:
    """Write ``pipeline``'s model directory at ``path`` atomically (:meth:`Pipeline.save`)."""
    from gmcert.latent.modelio import save_arrays

    pipeline._check_fitted()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "encoder": pipeline.encoder_name,
            "pretrained": pipeline.pretrained, "projection": pipeline.projection_kind,
            "n_components": pipeline.n_components, "input_shape": list(pipeline.input_shape_),
            "lipschitz": pipeline.lipschitz_,
            "batch_size": pipeline.batch_size, **pipeline.metadata,
        }
        if pipeline.encoder_name == "module":
            raise DataError("a pipeline with a custom torch encoder cannot be saved: give the encoder "
                            "as an encoder card (a .toml path) so that it can be rebuilt and checked")
        if pipeline.encoder_name not in LINEAR_ENCODERS:
            meta["encoder_description"] = pipeline.encoder_description()
        if pipeline.bundled_files:  # the card's weights path is relative to the card: both move together
            for name, source in pipeline.bundled_files.items():
                shutil.copyfile(source, tmp / name)
            meta.update(encoder=next(iter(pipeline.bundled_files)), bundled_files=list(pipeline.bundled_files))
        (tmp / "pipeline.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        pipeline.head.save(tmp / "head.npz")
        save_arrays(tmp / "projection.npz", {"format": "gmcert-projection", "format_version": 1},
                    pipeline.projection.to_arrays())
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pipeline(cls, path, device=None, cache_dir=None):
    """Read a model directory written by :func:`save_pipeline` into a ``cls`` (:meth:`Pipeline.load`)."""
    from gmcert.encoders.projection import projection_from_arrays
    from gmcert.latent.modelio import load_arrays

    path = Path(path)
    meta_path = path / "pipeline.json"
    if not path.exists():
        raise ModelFileError(path, "missing")
    if not meta_path.is_file():
        raise ModelFileError(path, "foreign", "no pipeline.json: not a gmcert model directory")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(meta_path, "corrupt", str(err)) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(meta_path, "foreign", f"format is not {FORMAT!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(meta_path, "newer_version",
                             f"version {meta['format_version']} > supported {FORMAT_VERSION}; upgrade gmcert")
    bundled = {str(name): path / str(name) for name in meta.get("bundled_files", [])}
    for name, where in bundled.items():
        if Path(name).name != name or not where.is_file():
            raise ModelFileError(where, "missing" if Path(name).name == name else "corrupt",
                                 "a file of the model's bundled encoder")
    pipeline = cls(encoder=str(bundled[meta["encoder"]]) if bundled else meta["encoder"], projection=meta["projection"], n_components=meta["n_components"],
                   head=GaussianMixtureClassifier.load(path / "head.npz"), pretrained=meta["pretrained"],
                   batch_size=meta.get("batch_size", 64), device=device, cache_dir=cache_dir)
    _, arrays = load_arrays(path / "projection.npz", "gmcert-projection", max_version=1)
    pipeline.projection = projection_from_arrays(arrays)
    pipeline.input_shape_ = tuple(meta["input_shape"])
    pipeline.bundled_files = bundled
    # The saved constants are a record, never trusted: a model file may come from someone else,
    # so they are recomputed from the rebuilt encoder (which must match its saved description).
    pipeline._saved_description = meta.get("encoder_description")
    if meta["encoder"] not in LINEAR_ENCODERS and pipeline._saved_description is None:
        raise ModelFileError(meta_path, "corrupt", "no encoder_description: cannot check the encoder")
    known = {"format", "format_version", "encoder", "pretrained", "projection", "n_components",
             "input_shape", "lipschitz", "batch_size", "encoder_description", "bundled_files"}
    pipeline.metadata = {k: v for k, v in meta.items() if k not in known}
    return pipeline

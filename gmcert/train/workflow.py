"""``gmcert train``: data and encoder in, a normal gmcert model directory out.

The trained network (a timm architecture with a classifier over the data's classes) is saved as
safetensors with an encoder card beside it; the Gaussian-mixture head is then refitted in closed
form on the encoder's latents of noisy training images, so the directory is an ordinary model
that ``certify``, ``compare`` and ``diagnose`` read unchanged. Checkpoints live in ``<out>.train/``
until the model directory is written, atomically, at the end.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gmcert.atomic import check_folder_target
from gmcert.errors import DataError
from gmcert.train.loop import TrainConfig, evaluate, finished, train_network

CHECKPOINT = "checkpoint.safetensors"
#: the head of a margin-trained student: one isotropic covariance shared by all classes (tied, shrunk
#: fully to the scaled identity), so its boundaries are the bisectors the margin objective widened.
#: Measured on digits: 0.88 / 0.69 certified at r = 0.25 / 0.5, against 0.57 / 0.00 with a
#: Ledoit-Wolf tied or full covariance, whose anisotropy puts the boundaries elsewhere.
MARGIN_HEAD = {"covariance_type": "tied", "shrinkage": 1.0}


def _toml(card: dict, weights: dict) -> str:
    """An encoder card; JSON's strings and arrays of numbers are valid TOML."""
    lines = ["# Written by `gmcert train`: the trained network, loaded with its weights beside it."]
    def value(v):  # a dict is an inline table; JSON's own object syntax is not TOML
        return "{" + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + "}" if isinstance(v, dict) else json.dumps(v)

    lines += [f"{k} = {value(v)}" for k, v in card.items() if k not in ("weights", "path")]
    lines += ["", "[weights]"] + [f"{k} = {json.dumps(v)}" for k, v in weights.items()]
    return "\n".join(lines) + "\n"


def build_student(encoder: str, n_classes: int, input_size=None, pretrained=None, device=None, seed: int = 0,
                  lipschitz: bool = False, model_args: dict | None = None):
    """The base card's network with a new ``n_classes`` classifier, as an Encoder (pixels -> logits).

    The new classifier is drawn from ``seed`` (a card without weights starts from its fixed random
    init), so the same arguments give the same student whatever torch's global random state.
    ``lipschitz``: the network's linear layers are kept orthogonal while training (PyTorch's own
    ``parametrizations.orthogonal``: exact orthogonality up to rounding, no extra dependency; the
    Lipschitz-layer libraries deel-torchlip and orthogonium would add one for layers this MLP does
    not need, and the certificate never trusts any of them: it bounds the stored weights by SVD);
    a network with ``constrain()`` (the conv students, :mod:`gmcert.networks.lipconv`) registers its
    own parametrisations instead. The student gets class centres in latent space (``centers``), what
    the margin objective and its predictions use. ``model_args`` (``--width``, ``--depth``) go to
    the architecture's constructor and into the card the model records.
    """
    from gmcert.encoders.cards import Encoder, _build, load_card

    card = load_card(encoder)
    if model_args:
        card = replace(card, model_args={**card.model_args, **model_args})
    if input_size is not None:
        hw = (int(input_size),) * 2 if np.ndim(input_size) == 0 else tuple(int(v) for v in input_size)
        if min(hw) < 1:
            raise DataError(f"--input-size must be a positive number of pixels, got {input_size}")
        card = replace(card, input_size=(card.input_size[0], *hw))
    if pretrained is None:
        pretrained = card.weights.get("source") != "none"
    network, digest = _build(card, pretrained)
    # timm's constructors swallow unknown keywords: the network says what it was built with
    ignored = [k for k, v in (model_args or {}).items() if getattr(network, "model_args", {}).get(k) != v]
    if ignored:
        raise DataError(f"{card.name} ({card.architecture}) takes no {', '.join(f'--{k}' for k in ignored)}: they "
                        "choose a Lipschitz student's size (gmcert_lipconv, gmcert_lipnet)")
    if lipschitz and not hasattr(network, "lipschitz_layers"):
        raise DataError("--student lipschitz needs a Lipschitz architecture (the gmcert_lipnet or gmcert_lipconv "
                        f"cards); {card.name} ({card.architecture}) is not one")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        network.reset_classifier(n_classes)
        if lipschitz and hasattr(network, "constrain"):  # a conv student: its own parametrisations
            network.constrain()
        elif lipschitz:
            from torch.nn.utils.parametrizations import orthogonal

            for layer in network.lipschitz_layers():
                # Cayley: measured here, torch's default Householder map for non-square weights
                # collapsed to 0 under AdamW within 20 steps; matrix_exp is 7x slower
                orthogonal(layer, orthogonal_map="cayley")
        if lipschitz:
            centers = torch.nn.Parameter(torch.randn(n_classes, network.num_features))
    card = replace(card, num_classes=int(n_classes), name=f"{card.name.replace(':', '-')}-trained")
    student = Encoder(network, card, digest, n_classes)
    if lipschitz:
        student.register_parameter("centers", centers)
    return student.to(device or _device())


def student_input_size(card, image_hw) -> tuple:
    """``(H, W)`` the student works at when no ``--input-size`` is given: the data's own size for a
    ``native_size`` card (gmcert's networks) from its ``min_size`` up, the card's size below that;
    for other cards their size, but at most 4x the data's (upsampling past 4x adds compute, not
    information: 224 px on 8 px digits costs ~50x)."""
    image_hw = tuple(int(v) for v in image_hw)
    if card.native_size:
        return image_hw if min(image_hw) >= card.min_size else tuple(card.input_size[1:])
    return (min(card.input_size[1], 4 * max(image_hw)),) * 2


def _content_digest(path):
    """The teacher's content (a model directory's files, or a weights file), so that a resume with a
    teacher overwritten at the same path is refused."""
    from gmcert.distributed.rows import model_digest
    from gmcert.inputs import file_digest

    if path is None:
        return None
    return model_digest(path) if Path(path).is_dir() else file_digest(path)


def _device():
    from gmcert.encoders.encoding import default_device

    return default_device()


def train_model(out, data: str = "digits", encoder: str | None = None, input_size=None,
                config: TrainConfig | None = None, teacher=None, pretrained=None, n_components: int = 64,
                test_size: float = 0.25, device=None, progress: bool = True, stop_after=None, limit=None,
                data_root=None, model_args: dict | None = None):
    """Train a noise-robust base (or a Lipschitz student) on ``data``; write a gmcert model directory to ``out``.

    ``encoder`` defaults to ``gmcert_cnn``; for ``config.student="lipschitz"``, to ``gmcert_lipnet`` on
    images of at most 8x8 pixels and to the convolutional ``gmcert_lipconv`` above.
    ``input_size`` (px, or ``(H, W)``) defaults to :func:`student_input_size`: gmcert's own networks
    take the data's native size; another size is printed with its norm and recorded (``resize``).
    ``data_root``: where the data's files are (Fashion-MNIST's IDX files; ``--data-root``).
    ``model_args``: the architecture's constructor keywords (``--width``, ``--depth``).

    Returns ``(pipeline, record)``, or ``(None, record)`` when ``stop_after`` epochs ran before the
    end (the checkpoint in ``<out>.train/`` resumes the run) and on ranks other than 0 of a torchrun
    job (DistributedDataParallel; rank 0 writes the model). See :class:`TrainConfig` for the methods.
    """
    from gmcert.inputs import fit_split, load_inputs

    config = config or TrainConfig()
    lipschitz = config.student == "lipschitz"
    out = Path(out)
    staging = Path(f"{out}.train")
    check_folder_target(out, "--out", owner_file="pipeline.json")
    check_folder_target(staging, "--out", owner_file=CHECKPOINT)
    from gmcert.encoders.cards import load_card

    from gmcert.data import resolve_split
    from gmcert.encoders.resizing import describe_resize, resize_record

    channels = load_card(encoder or ("gmcert_lipnet" if lipschitz else "gmcert_cnn")).input_size[0]
    if Path(str(data)).exists():  # a file or folder: recorded absolute, so certify finds it from anywhere
        data = str(Path(str(data)).resolve())
    data = resolve_split(data, "train")  # recorded with its split: certify's held-out rows come from it
    inputs = load_inputs({"data": data}, channels=channels, limit=limit, root=data_root)
    if encoder is None:  # a Lipschitz student: the MLP on 8x8 images, the conv student above (both 1 channel)
        encoder = ("gmcert_lipconv" if max(inputs.x.shape[2:]) > 8 else "gmcert_lipnet") if lipschitz else "gmcert_cnn"
    train, test = fit_split(inputs.labels, test_size, config.seed)
    classes, y_all = np.unique(inputs.labels, return_inverse=True)
    device = torch.device(device) if device is not None else _device()
    if input_size is None:
        input_size = student_input_size(load_card(encoder), inputs.x.shape[2:])
    student = build_student(encoder, len(classes), input_size, pretrained, device, seed=config.seed,
                            lipschitz=lipschitz, model_args=model_args)
    resize = resize_record(student.card, inputs.x.shape[2:])
    if progress and resize is not None:
        print(describe_resize(resize), file=sys.stderr)
    images, labels = torch.as_tensor(inputs.x, dtype=torch.float32), torch.as_tensor(y_all, dtype=torch.long)
    teacher_module = None
    if config.method == "crt":
        from gmcert.train.teacher import load_teacher

        if teacher is None:
            raise DataError("crt needs a teacher (--teacher MODEL): a gmcert model directory with the same classes")

        teacher_module = load_teacher(teacher, classes, tuple(inputs.x.shape[1:]), device)
    elif config.method == "margin" and teacher is not None:
        from gmcert.train.teacher import load_latent_teacher

        teacher_module = load_latent_teacher(teacher, tuple(inputs.x.shape[1:]), device)
        with torch.no_grad():
            width = teacher_module(torch.zeros((1, *inputs.x.shape[1:]), device=device)).shape[1]
        student.register_parameter("distill_map", torch.nn.Parameter(
            torch.zeros(student.card.feature_dim, width, device=device)))
    elif teacher is not None:
        raise DataError(f"--teacher is used by the crt and margin methods only, not {config.method}")
    identity = json.loads(json.dumps({"data": inputs.identity, "encoder": student.describe(),
                                      "teacher": str(teacher) if teacher is not None else None,
                                      "teacher_content": _content_digest(teacher)}, default=str))
    from gmcert.distributed import agree, current as current_world

    agree({"config": config.as_dict(), "identity": identity}, "the training settings and data")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        record = train_network(student, images[train], labels[train], config, teacher=teacher_module,
                               checkpoint=staging / CHECKPOINT, held_out=(images[test], labels[test]),
                               identity=identity, progress=progress, stop_after=stop_after)
    except BaseException:
        if not (staging / CHECKPOINT).exists() and current_world().main:  # nothing to resume: leave nothing behind
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if not finished(config, record):
        return None, record
    if not current_world().main:  # under torchrun, rank 0 alone fits the head and writes the model directory
        return None, record
    record["resize"] = resize
    _finish(out, staging, student, inputs, classes, train, test, config, record, n_components, device)
    shutil.rmtree(staging, ignore_errors=True)
    from gmcert.pipeline import Pipeline

    return Pipeline.load(out, device=device), record  # its files where they now live, not in the staging folder


def _finish(out, staging, student, inputs, classes, train, test, config, record, n_components, device):
    """Weights and card, the closed-form head on noisy latents, the curves; then the model directory."""
    from safetensors.torch import save_file

    from gmcert.encoders.cards import file_sha256
    from gmcert.pipeline import Pipeline
    from gmcert.train.curves import plot_training

    if config.student == "lipschitz":  # store the weights themselves: what the certificate bounds
        from torch.nn.utils import parametrize

        for layer in student.network.lipschitz_layers():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            # contiguous, as the file and every later load are (a transposed view rounds otherwise)
            layer.weight = torch.nn.Parameter(layer.weight.detach().contiguous())
    weights = staging / "encoder.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in student.network.state_dict().items()}, str(weights))
    card = staging / "encoder.toml"
    card.write_text(_toml(student.card.as_dict(), {"source": "file", "path": weights.name, "mapping": "names",
                                                   "sha256": file_sha256(weights)}))
    dim = min(int(n_components), int(student.card.feature_dim))
    x = np.asarray(inputs.x[train], dtype=np.float32)
    if config.method == "margin":  # the latents as trained (no projection), clean: no noise is certified
        from gmcert.latent.mixture import GaussianMixtureClassifier

        head = GaussianMixtureClassifier(**MARGIN_HEAD)
        pipeline = Pipeline(encoder=str(card), projection="none", head=head, pretrained=True, device=device)
        pipeline.fit(x, inputs.labels[train])
    else:
        pipeline = Pipeline(encoder=str(card), projection="pca", n_components=dim, pretrained=True, device=device)
        rng = np.random.default_rng(config.seed)
        noisy = np.concatenate([x + rng.normal(0.0, config.sigma, x.shape).astype(np.float32)
                                for _ in range(config.head_copies)])
        pipeline.fit(noisy, np.tile(inputs.labels[train], config.head_copies))
    pipeline.input_shape_ = tuple(x.shape[1:])
    record["train_rows"], record["test_rows"] = int(len(train)), int(len(test))
    record["network"] = record["head"] = None  # --test-size 0: no held-out split to measure them on
    if len(test):
        held = np.asarray(inputs.x[test], dtype=np.float32)
        record["network"] = dict(zip(("clean_accuracy", "noisy_accuracy"), evaluate(
            student, torch.as_tensor(held), torch.as_tensor(np.searchsorted(classes, inputs.labels[test])),
            config.sigma, seed=config.seed + 7)))
        noisy_held = held + np.random.default_rng(config.seed + 7).normal(0.0, config.sigma, held.shape).astype(np.float32)
        record["head"] = {"clean_accuracy": float(np.mean(pipeline.predict(held, arithmetic="fast") == inputs.labels[test])),
                          "noisy_accuracy": float(np.mean(pipeline.predict(noisy_held, arithmetic="fast") == inputs.labels[test]))}
    (staging / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_training(record["history"], staging / "training_curves.png",
                  title=f"{config.method}, sigma={config.sigma}, {student.card.name}")
    pipeline.bundled_files = {name: staging / name for name in
                              ("encoder.toml", "encoder.safetensors", "train.json", "training_curves.png")}
    pipeline.metadata = {"data": str(inputs.source), "channels": int(inputs.x.shape[1]), "test_index": test.tolist(),
                         "seed": config.seed, "noise_sigma": config.sigma, "noise_copies": config.head_copies,
                         "resize": record["resize"],
                         "train": {"config": config.as_dict(), "network": record["network"],
                                   "head": record["head"]}}
    pipeline.save(out)
    return pipeline

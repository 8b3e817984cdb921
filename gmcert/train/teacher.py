"""Teachers for certified robustness transfer: a saved gmcert model or a torch classifier.

The teacher must map the student's pixels to logits over the same classes. A gmcert model trained
by ``gmcert train`` under noise teaches with its network's own classifier logits (what CRT
distils); any other gmcert model (fitted, or a margin-trained Lipschitz student, whose classifier
is never trained) teaches with its Gaussian-mixture head's log joint densities, s_k(z) / 2 (their
softmax is the head's posterior).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from gmcert.errors import DataError


class _HalfScores(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x) / 2


def _frozen(module, device) -> nn.Module:
    """On ``device``, in eval mode, and out of every gradient: a teacher is never trained."""
    module = module.to(device).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def load_teacher(teacher, classes, input_shape, device) -> nn.Module:
    """The frozen teacher (eval mode, no gradients) on ``device``.

    Parameters
    ----------
    teacher : path or torch.nn.Module
        A gmcert model directory, or a module mapping ``(N, *input_shape)`` pixels to ``(N, K)`` logits
        indexed like ``classes``.
    classes : array
        The training labels' sorted class values.
    input_shape : tuple
        ``(C, H, W)`` of the training images.
    """
    classes = np.asarray(classes)
    if isinstance(teacher, (str, Path)):
        from gmcert.inputs import load_model

        pipeline = load_model(teacher, device=device)
        where = f"teacher {teacher}"
        if not np.array_equal(np.asarray(pipeline.head.classes_), classes):
            raise DataError(f"{where} has classes {np.asarray(pipeline.head.classes_).tolist()}, the training "
                            f"data has {classes.tolist()}")
        if tuple(pipeline.input_shape_) != tuple(input_shape):
            raise DataError(f"{where} takes inputs of shape {tuple(pipeline.input_shape_)}, the training data has "
                            f"{tuple(input_shape)}")
        trained = pipeline.metadata.get("train", {}).get("config", {})
        if trained and pipeline.bundled_files and trained.get("method") != "margin":  # margin: no classifier
            from gmcert.encoders.cards import load_classifier

            module = load_classifier(pipeline.encoder_name, pretrained=True)
        else:
            module = _HalfScores(pipeline.torch_module())
    elif isinstance(teacher, nn.Module):
        module, where = teacher, f"teacher {type(teacher).__name__}"
    else:
        raise DataError(f"a teacher must be a gmcert model directory or a torch module, got {type(teacher).__name__}")
    module = _frozen(module, device)
    try:
        with torch.no_grad():
            out = module(torch.zeros((1, *input_shape), device=device))
    except (RuntimeError, ValueError, DataError) as err:
        raise DataError(f"{where} cannot take inputs of shape {tuple(input_shape)}: "
                        f"{str(err).splitlines()[0]}") from None
    if tuple(out.shape) != (1, len(classes)):
        raise DataError(f"{where} gives outputs of shape {tuple(out.shape[1:])}, not logits over the training "
                        f"data's {len(classes)} classes")
    return module


def load_latent_teacher(teacher, input_shape, device) -> nn.Module:
    """The targets of latent distillation, frozen: a saved gmcert model's map pixels -> head inputs z
    (encoder, then projection), or a pretrained encoder card's (``efficientnet_lite0``,
    ``timm:<name>``) pixels -> features. Anything else is a clear error."""
    if not isinstance(teacher, (str, Path)):
        raise DataError(f"a latent teacher must be a gmcert model directory or an encoder card, got "
                        f"{type(teacher).__name__}")
    if Path(teacher).is_dir():
        from gmcert.inputs import load_model

        pipeline = load_model(teacher, device=device)
        if tuple(pipeline.input_shape_) != tuple(input_shape):
            raise DataError(f"teacher {teacher} takes inputs of shape {tuple(pipeline.input_shape_)}, the training "
                            f"data has {tuple(input_shape)}")
        module = nn.Sequential(pipeline.encoder, pipeline.projection.to_torch())
    else:
        from gmcert.encoders.cards import load_card, load_encoder

        card = load_card(teacher)
        if card.input_size[0] != input_shape[0]:
            raise DataError(f"teacher {teacher} takes {card.input_size[0]}-channel images, the training data has "
                            f"{input_shape[0]}")
        module = load_encoder(card, pretrained=True)
    module = _frozen(module, device)
    return module

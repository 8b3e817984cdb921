"""gmcert's own small encoders, registered with timm so that cards and ``timm.create_model``
build them like any other architecture.

* ``gmcert_cnn`` / ``gmcert_cnn_tiny``: small CNNs, bases for smoothing (``gmcert train``);
* ``gmcert_lipmlp``: a 1-Lipschitz MLP (orthogonal linear layers, GroupSort), whose closed-form
  certificates are sound and useful from one pass (``gmcert train --student lipschitz``);
* ``gmcert_lenet``: LeNet-5, the base of the published Fashion-MNIST rows (``gmcert train --arch lenet``).

Their cards say ``native_size = true``: ``gmcert train`` builds them at the data's own size
(``img_size``), so nothing is resized.

They exist for what a 2-core CPU can train in minutes: noise-robust bases on 8 to 32 px images
(``gmcert train``) and tests. Every layer is one that :mod:`gmcert.bounds.lipschitz` and
:mod:`gmcert.bounds.rounding` bound soundly (convs, BatchNorm, ReLU, max and global average pools,
linear), so closed-form certificates cover them too. They follow timm's model API
(``num_features``, ``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``).
"""
from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

#: name -> channels of the three conv stages (the third stage's width is the latent dimension).
WIDTHS = {"gmcert_cnn": (32, 64, 128), "gmcert_cnn_tiny": (8, 16, 32)}


class TimmModel(nn.Module):
    """timm's model API (``num_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``)
    over a subclass's ``forward_features``; ``pool`` (then ``flatten``) makes the features a vector,
    or is None when they already are one."""

    def forward_head(self, x, pre_logits: bool = False):
        if getattr(self, "pool", None) is not None:
            x = self.flatten(self.pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.classifier

    def reset_classifier(self, num_classes: int, *args, **kwargs):
        self.num_classes = int(num_classes)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def built(model, name, pretrained, in_chans, std, hint):
    """``model`` with the pretrained_cfg timm expects; these architectures have no pretrained weights."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights: {hint}")
    model.pretrained_cfg = model.default_cfg = {
        "architecture": name, "tag": "", "input_size": (in_chans, 8, 8), "mean": (0.5,) * in_chans,
        "std": (std,) * in_chans, "interpolation": "bilinear", "num_classes": model.num_classes}
    return model


class SmallCNN(TimmModel):
    """Three conv-BN-ReLU stages (the last two strided by 2), global average pool, linear classifier."""

    def __init__(self, widths=(32, 64, 128), in_chans: int = 3, num_classes: int = 1000):
        super().__init__()
        layers, previous = [], int(in_chans)
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.num_features = int(previous)
        self.num_classes = int(num_classes)
        self.classifier = nn.Linear(previous, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        return self.features(x)


def _create(name, pretrained=False, in_chans=3, num_classes=1000, **_timm_kwargs):
    return built(SmallCNN(WIDTHS[name], in_chans=in_chans, num_classes=num_classes), name, pretrained, in_chans, 0.5,
                 "train it with `gmcert train`")


@register_model
def gmcert_cnn(pretrained=False, **kwargs):
    """32-64-128 channels, about 93k parameters."""
    return _create("gmcert_cnn", pretrained, **kwargs)


@register_model
def gmcert_cnn_tiny(pretrained=False, **kwargs):
    """8-16-32 channels, about 6k parameters (tests)."""
    return _create("gmcert_cnn_tiny", pretrained, **kwargs)


class GroupSort(nn.Module):
    """Sort pairs of features (MaxMin, Anil et al. 2019): a permutation of its input on every pair,
    so 1-Lipschitz in L2, gradient-norm preserving, and exact in floating point.

    Parameters
    ----------
    halves : bool, default False
        Pair feature ``i`` with ``i + C/2`` and write the maxima first, then the minima
        (orthogonium's ``MaxMin``); by default consecutive features ``2i, 2i + 1`` are paired and
        each pair is written in place.
    min_first : bool, default False
        Each pair's minimum first (deel-torchlip's ``GroupSort2``).
    """

    def __init__(self, halves: bool = False, min_first: bool = False):
        super().__init__()
        self.halves, self.min_first = bool(halves), bool(min_first)

    def forward(self, x):
        a, b = x.chunk(2, dim=1) if self.halves else x.unflatten(1, (-1, 2)).unbind(2)
        high, low = torch.maximum(a, b), torch.minimum(a, b)
        pair = (low, high) if self.min_first else (high, low)
        return torch.cat(pair, dim=1) if self.halves else torch.stack(pair, dim=2).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"halves={self.halves}, min_first={self.min_first}"


class LipschitzMLP(TimmModel):
    """Flatten -> (linear -> GroupSort) x depth -> linear to ``latent_dim``; trained with orthogonal
    weights (``gmcert.train``), so every layer has spectral norm 1 and the whole map is 1-Lipschitz.
    Its certificates never rely on that promise: :mod:`gmcert.bounds.lipschitz` bounds the stored
    weights by exact SVD. ``in_features`` fixes the input size (1x8x8 digits by default)."""

    def __init__(self, in_chans=1, num_classes=1000, in_pixels=64, width=256, depth=3, latent_dim=64):
        super().__init__()
        self.flatten = nn.Flatten()
        self.model_args = {"width": int(width), "depth": int(depth)}  # what --width and --depth chose
        layers, previous = [], in_chans * in_pixels
        for _ in range(depth):
            layers += [nn.Linear(previous, width), GroupSort()]
            previous = width
        layers.append(nn.Linear(previous, latent_dim))
        self.layers = nn.Sequential(*layers)
        self.in_features, self.num_features, self.num_classes = in_chans * in_pixels, latent_dim, int(num_classes)
        self.classifier = nn.Linear(latent_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        if x[0].numel() != self.in_features:
            from gmcert.errors import DataError

            raise DataError(f"gmcert_lipmlp takes {self.in_features} pixels per image, got {tuple(x.shape[1:])}: "
                            "keep the card's input size")
        return self.layers(self.flatten(x))

    def lipschitz_layers(self):
        """The linear layers that training keeps orthogonal (the classifier is not part of the encoder)."""
        return [m for m in self.layers if isinstance(m, nn.Linear)]


@register_model
def gmcert_lipmlp(pretrained=False, in_chans=1, num_classes=1000, img_size=(8, 8), width=256, depth=3,
                  **_timm_kwargs):
    """1xHxW (default 8x8) -> 256 -> 256 -> 256 -> 64 latents (``width``, ``depth``), 1-Lipschitz
    when trained by `gmcert train --student lipschitz`."""
    model = LipschitzMLP(in_chans=in_chans, num_classes=num_classes, in_pixels=int(img_size[0]) * int(img_size[1]),
                         width=int(width), depth=int(depth))
    return built(model, "gmcert_lipmlp", pretrained, in_chans, 1.0, "train it with `gmcert train --student lipschitz`")


class LeNet(TimmModel):
    """LeNet-5 as in the published Fashion-MNIST smoothing rows (Cohen et al.'s CERTIFY, CAT-RS):
    conv(6, 5x5) - ReLU - max-pool 2 - conv(16, 5x5) - ReLU - max-pool 2 - fc 120 - ReLU - fc 84 -
    ReLU; the latents are those 84 features, the classifier a linear layer on them. About 0.3 M
    multiply-adds on a 28x28 image. No padding, so the input must be at least 16 px a side."""

    def __init__(self, in_chans=1, num_classes=1000, img_size=(28, 28)):
        super().__init__()
        h, w = (int(v) for v in img_size)
        if min(h, w) < 16:
            from gmcert.errors import DataError

            raise DataError(f"LeNet needs images of at least 16x16 px, got {h}x{w} (its card resizes smaller ones)")
        self.features = nn.Sequential(nn.Conv2d(in_chans, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.flatten = nn.Flatten()
        side = lambda n: ((n - 4) // 2 - 4) // 2  # noqa: E731  (two valid 5x5 convs, two 2x2 pools)
        self.fc = nn.Sequential(nn.Linear(16 * side(h) * side(w), 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.num_features, self.num_classes = 84, int(num_classes)
        self.classifier = nn.Linear(84, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        return self.fc(self.flatten(self.features(x)))


@register_model
def gmcert_lenet(pretrained=False, in_chans=1, num_classes=1000, img_size=(28, 28), **_timm_kwargs):
    """LeNet-5 (6-16 conv channels, 120-84 fully connected), 84 latents; about 44k parameters at 28 px."""
    return built(LeNet(in_chans, num_classes, img_size), "gmcert_lenet", pretrained, in_chans, 0.5,
                 "train it with `gmcert train --arch lenet`")

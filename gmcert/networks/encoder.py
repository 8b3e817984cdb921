"""The module a card builds: resize, normalise, then the timm network (:mod:`gmcert.encoders.cards`
builds it; the bounds take it apart)."""
from __future__ import annotations

import torch
from torch import nn

from gmcert.data import Resize
from gmcert.errors import DataError


class Encoder(nn.Module):
    """Pixels in [0, 1] -> resize to the card's size -> normalise -> timm network.

    Attributes
    ----------
    card : gmcert.encoders.cards.EncoderCard
    weights_hash : str
        ``sha256:<hex>`` of the weights file, or ``"random-init"``.
    resize : gmcert.data.Resize
    network : torch.nn.Module
        The timm model; with its classifier removed for :func:`load_encoder`.
    output_dim : int
        ``feature_dim`` of the card, or ``num_classes`` for :func:`load_classifier`.
    """

    def __init__(self, network: nn.Module, card, weights_hash: str, output_dim: int):
        super().__init__()
        self.card, self.weights_hash, self.output_dim = card, weights_hash, int(output_dim)
        self.resize = Resize(card.input_size[1:], card.interpolation)
        self.register_buffer("mean", torch.tensor(card.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(card.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.network = network

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.card.input_size[0]:
            raise DataError(f"encoder {self.card.name} expects (N, {self.card.input_size[0]}, H, W) "
                              f"pixels, got {tuple(x.shape)}")
        return self.network((self.resize(x) - self.mean) / self.std)

    def describe(self) -> dict:
        """Card and weights hash: what a cache key or a saved model must record."""
        return {"card": self.card.as_dict(), "weights_hash": self.weights_hash}

"""The fitted projection as a torch module (for smoothing the whole pipeline, and for the bounds,
which recognise it); :mod:`gmcert.encoders.projection` fits it."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ProjectionLayer(nn.Module):
    """``z = (x - mean) @ weight.T``: an affine map with orthonormal-row ``weight`` ``(k, d)``."""

    def __init__(self, mean: np.ndarray, weight: np.ndarray, dtype=torch.float32):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=dtype))
        self.register_buffer("weight", torch.as_tensor(weight, dtype=dtype))

    def forward(self, x):
        return (x.flatten(1) - self.mean) @ self.weight.T

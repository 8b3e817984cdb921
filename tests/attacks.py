"""Attacks that check certified radii from outside: the pipeline in float64, and projected gradient
on the score margin from random starts inside an L2 ball (shared by the radius tests)."""
import copy

import torch
from torch import nn

from gmcert.head import GaussianHead


def float64_module(pipeline):
    return nn.Sequential(copy.deepcopy(pipeline.encoder).double(), pipeline.projection.to_torch(torch.float64),
                         GaussianHead(pipeline.head, dtype=torch.float64)).eval()


def attack(module, x, index, radius, steps=50, starts=3, seed=0):
    """Projected gradient on the score margin plus random directions, inside the ball of ``radius``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float64)
    r = torch.as_tensor(radius, dtype=torch.float64).view(-1, *([1] * (x.ndim - 1)))
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(starts):
        delta = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        delta = delta / delta.flatten(1).norm(dim=1).view_as(r) * r * 0.5
        for _ in range(steps):
            delta.requires_grad_(True)
            scores = module(x + delta)
            own = scores.gather(1, index[:, None])[:, 0]
            other = scores.masked_fill(nn.functional.one_hot(index, scores.shape[1]).bool(), -torch.inf).max(1).values
            (grad,) = torch.autograd.grad((own - other).sum(), delta)
            with torch.no_grad():
                flipped |= (own < other)
                delta = delta - 0.1 * r * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(r)
                delta = delta * torch.clamp(r / delta.flatten(1).norm(dim=1).view_as(r), max=1.0)
        with torch.no_grad():
            flipped |= module(x + delta).argmax(1) != index
    return flipped.numpy()

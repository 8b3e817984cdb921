"""A contractive deep-equilibrium encoder, ``gmcert_cdeq``: its cell is a certified contraction, so
a warm-started answer can be *verified* equal to the standard (cold) solve's, with no audit.

The cell is F(z, u) = ReLU(W2 ReLU(W1 z) + u), u = stem(x). ReLU is 1-Lipschitz and u does not
depend on z, so ||F(z, u) - F(z', u)|| <= ||W1|| ||W2|| ||z - z'||: with the convolutions' operator
norms bounded, F is a contraction with constant L = ||W1|| ||W2|| < 1 and has exactly one fixed
point z*(x). Training keeps each ||W_i|| at most sqrt(``contraction``): the weights are rescaled by
their exact operator norm on this input size (the largest singular value of the kernel's 2-D DFT
over the padded grid, as in Sedghi et al. 2019, differentiable). The constant the certificates use
is recomputed from the stored weights by :func:`gmcert.bounds.contraction.contraction_constants`
(float64, rounded up), never taken from training.

The standard DEQ (the classifier smoothing certifies) solves from a cold start z = 0 with a
per-sample stop: each sample keeps its first iterate whose computed residual ||F(z) - z|| is at
most ``tol`` (plain fixed-point steps, which a contraction always brings there). So every standard
answer has residual at most ``tol`` and does not depend on the samples beside it;
:mod:`gmcert.smoothing.verified` turns that into a ball around any warm iterate that holds the
standard answer.

"The standard DEQ" is this solve in layout-free arithmetic (:func:`gmcert.networks.deq.layout_free_arithmetic`, which
every evaluation in eval mode runs in): no TF32, cuDNN, oneDNN or NNPACK, and torch's
deterministic algorithms, so that each convolution is a per-sample product whose bits do not depend
on the batch a sample shares. Measured on 2 CPU cores (random-init cell, 64 samples): with torch's
default kernels the fixed point of a sample solved alone differs from the same sample's in the
batch of 64 by up to 2.4e-7; in this arithmetic by 0 (also for splits 37 + 27), at 2.2 to 2.6 s
against 1.0 to 1.7 s per 1,000 cold solves (two runs, beside other jobs). ``gmcert_deq``'s Anderson
solve amplifies the same kernels' differences to 2.5e-4 (0 here, at 21 s against 17 s).

The solve is written here rather than taken from ``torchdeq`` (which trains this cell, with
implicit differentiation): torchdeq's solvers stop on the batch's residual, not each sample's.
"""
from __future__ import annotations

import math

import torch
from timm.models import register_model
from torch import nn

from gmcert.networks.arithmetic import layout_free_arithmetic
from gmcert.networks.small import TimmModel, built
from gmcert.errors import DataError


#: rounding: the stored weights' norms are multiplied by this before use (relative float64 error of
#: the DFT and SVD is about 1e-15; this leaves a wide margin)


def dft_operator_norm(weight: torch.Tensor, hw) -> torch.Tensor:
    """Operator norm of a 3x3, stride-1, padding-1 convolution on ``hw`` inputs (differentiable):
    the zero-padded conv is a compression of the circular one on the (H+2) x (W+2) grid, whose
    singular values are those of the kernel's DFT at each frequency."""
    grid = (int(hw[0]) + 2, int(hw[1]) + 2)
    spectrum = torch.fft.fft2(weight, s=grid).permute(2, 3, 0, 1)  # (H+2, W+2, c_out, c_in)
    return torch.linalg.matrix_norm(spectrum, ord=2).max()


class ContractiveCell(nn.Module):
    """F(z, u) = ReLU(W2 ReLU(W1 z) + u), each ||W_i|| kept <= sqrt(contraction) on ``hw`` inputs."""

    def __init__(self, width: int, contraction: float, hw=(8, 8)):
        super().__init__()
        if not 0 < contraction < 1:
            raise ValueError(f"contraction must lie in (0, 1), got {contraction}")
        self.conv1, self.conv2 = (nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(2))
        self.contraction, self.hw = float(contraction), tuple(int(v) for v in hw)
        self.weights = None  # the rescaled (W1, W2) for the current pass, set by ``prepare``

    def prepare(self):
        """Rescale the raw weights once per pass: W = V * min(1, sqrt(c) / ||V||). Out of training
        the result is kept until the raw weights change (their version counters)."""
        raw = (self.conv1.weight, self.conv2.weight)
        key = tuple((v.data_ptr(), v._version, v.device) for v in raw)
        if not self.training and not torch.is_grad_enabled() and getattr(self, "_key", None) == key:
            return
        cap = math.sqrt(self.contraction)
        self.weights = [v * torch.clamp(cap / dft_operator_norm(v, self.hw), max=1.0) for v in raw]
        self._key = key if not self.training and not torch.is_grad_enabled() else None

    def forward(self, z, u):
        w1, w2 = self.weights
        return torch.relu(nn.functional.conv2d(torch.relu(nn.functional.conv2d(z, w1, padding=1)), w2, padding=1) + u)


def fixed_point(f, z0, tol: float, max_iter: int):
    """Plain fixed-point steps with a per-sample stop: each sample keeps its first iterate whose
    computed residual ||f(z) - z|| is at most ``tol`` and leaves the batch. Returns ``(z, residual,
    evaluations)``; a contraction reaches any tolerance above float32's noise floor.

    Plain steps, not Anderson acceleration: on this cell (16 channels on 8x8) Anderson needed fewer
    cell evaluations (8 against 14 to residual 1e-3) but its mixing cost more than they saved,
    measured 0.27 s against 0.08 s per 1,000 cold solves on 2 CPU cores."""
    n = len(z0)
    out, res_out = torch.zeros_like(z0), torch.full((n,), math.inf, dtype=z0.dtype, device=z0.device)
    pending, z, evaluations = torch.arange(n, device=z0.device), z0, 0
    for _ in range(int(max_iter)):
        fz = f(z, pending)
        evaluations += len(pending)
        res = (fz - z).flatten(1).norm(dim=1)
        hit = res <= tol
        out[pending[hit]], res_out[pending[hit]] = z[hit], res[hit]
        pending, z = pending[~hit], fz[~hit]
        if not len(pending):
            return out, res_out, evaluations
    raise RuntimeError(f"the contractive DEQ did not reach residual {tol} in {max_iter} steps (float32's noise "
                       "floor is about 1e-6 of ||z||: raise tol)")


class ContractiveDEQ(TimmModel):
    """Stem -> fixed point of :class:`ContractiveCell` -> average pool -> classifier (timm's model API).

    For serialized smoothing, ``serial_state`` set makes a pass take ``serial_steps`` plain steps
    from it and leave, in ``last_state``/``last_previous``/``last_u``, the final iterate, the one
    before it and the injection, which verification needs; ``last_steps`` counts cell evaluations
    per sample.
    """

    def __init__(self, in_chans=1, num_classes=1000, width=16, contraction=0.5, tol=1e-3, max_iter=200,
                 train_max_iter=12, pooled=4, hw=(8, 8)):
        super().__init__()
        from torchdeq import get_deq

        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.GroupNorm(8, width))
        self.cell = ContractiveCell(width, contraction, hw)
        self.tol, self.max_iter, self.train_max_iter = float(tol), int(max_iter), int(train_max_iter)
        self.deq = get_deq(f_solver="fixed_point_iter", f_max_iter=self.train_max_iter, f_tol=self.tol, ift=True)
        if hw[0] % pooled or hw[1] % pooled:
            raise ValueError(f"the {hw} feature map must split evenly into {pooled}x{pooled} pooling windows")
        self.pooled = int(pooled)
        self.pool, self.flatten = nn.AvgPool2d((hw[0] // pooled, hw[1] // pooled)), nn.Flatten()
        self.num_features, self.num_classes = int(width) * pooled * pooled, int(num_classes)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.last_state = self.last_previous = self.last_u = None
        self.last_steps = 0
        self.serial_state, self.serial_steps = None, 1

    def forward_features(self, x):
        if self.training:
            return self._features(x)
        with layout_free_arithmetic(x.device):
            return self._features(x)

    def _features(self, x):
        if tuple(x.shape[-2:]) != self.cell.hw:
            raise DataError(f"gmcert_cdeq's contraction is certified on {self.cell.hw} inputs, got "
                            f"{tuple(x.shape[-2:])}: keep the card's input size")
        u = self.stem(x)
        self.cell.prepare()
        self.last_u = u.detach()
        if self.serial_state is not None:
            z = self.serial_state.to(u)[: len(u)]
            previous = z
            for _ in range(self.serial_steps):
                previous, z = z, self.cell(z, u)
            self.last_state, self.last_previous, self.last_steps = z.detach(), previous.detach(), self.serial_steps
            return z
        if self.training:
            return self.deq(lambda z: self.cell(z, u), torch.zeros_like(u))[0][-1]
        z, _, evaluations = fixed_point(lambda z, rows: self.cell(z, u[rows]), torch.zeros_like(u), self.tol,
                                        self.max_iter)
        self.last_state, self.last_previous, self.last_steps = z.detach(), None, evaluations / max(len(u), 1)
        return z


@register_model
def gmcert_cdeq(pretrained=False, in_chans=1, num_classes=1000, **_timm_kwargs):
    """A contractive convolutional DEQ, 16 channels, L <= 0.5: fixed-point steps to residual 1e-3 from a cold start."""
    return built(ContractiveDEQ(in_chans=in_chans, num_classes=num_classes), "gmcert_cdeq", pretrained, in_chans, 0.5,
                 "train it with `gmcert train --encoder gmcert_cdeq`")

"""gmcert's convolutional 1-Lipschitz students, registered with timm: ``gmcert_lipconv_small`` and
``gmcert_lipconv_medium`` (``width`` and ``depth`` through ``timm.create_model`` choose others).

The network, on any input size and 1 or 3 channels (``in_chans``)::

    stem conv 3x3 -> MaxMin -> [ (conv 3x3 -> MaxMin) x depth -> pad to even -> pixel-unshuffle
    -> 1x1 conv (4c -> 2c) ] x stages -> global L2-norm pool -> linear (8c -> latent_dim)

Every module is a plain one that :mod:`gmcert.bounds.lipschitz` bounds from its stored weights:
``nn.Conv2d`` (any stride and group count; circular padding: the exact DFT norm; zero padding: the
DFT norm on the padded grid, an upper bound), ``nn.Linear`` (exact SVD), MaxMin
(:class:`gmcert.networks.small.GroupSort`, a permutation of each channel pair: 1),
zero padding to an even size (an isometric embedding: 1), ``nn.PixelUnshuffle`` (a permutation: 1)
and :class:`GlobalNormPool` (per channel ``||x_c||_2``; 1 by the reverse triangle inequality).
None of them rescales or orthogonalises a weight in its forward pass: what a card stores is what
runs and what is bounded, in float32 (``predict``) and float64 (``certify``) alike.

While training (``gmcert train --student lipschitz``), :meth:`LipschitzConvNet.constrain` adds
PyTorch parametrisations that keep each layer's norm at most 1; ``gmcert.train`` removes them
(``leave_parametrized=True``) before saving, so the stored tensor is the constrained one:

* 3x3 convs: block orthogonal kernels (:class:`BlockOrthogonal`, BCOP): orthogonal at every input
  size, so gradient-norm preserving. Measured here first with AOL rescaling (Prach & Lampert 2022),
  which keeps the norm at most 1 without orthogonality: moving a 3x3 kernel with an orthogonal
  centre tap by noise of 0.01 already brought a 4-channel student's exact bound to 0.49 and its
  largest stretch to 0.28, a contraction that stacks with depth. Written here, rather than taken
  from orthogonium or deel-torchlip: their layers run their own forward passes whose norm claims
  rest on power iteration (issue 27: orthogonium's AOC measured 1.0000015 to 1.0000020, deel's
  convs 0.909 to 0.995); gmcert needs a plain ``nn.Conv2d`` at the end and bounds it itself.
* 1x1 convs: the Q factor of a QR decomposition (:class:`Orthonormal`), orthonormal rows, norm 1;
* the final linear map: ``torch.nn.utils.parametrizations.orthogonal`` (Cayley), as for the MLP student.

The certificate trusts none of them: it bounds the materialised weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from gmcert.networks.small import GroupSort, TimmModel, built

#: name -> (width, depth): channels of the first stage, convs per stage
SIZES = {"gmcert_lipconv_small": (16, 2), "gmcert_lipconv_medium": (32, 3)}


class PadToEven(nn.Module):
    """Zero rows and columns at the bottom and right up to even sizes: an isometric embedding (norm 1,
    exact in floating point), so that :class:`nn.PixelUnshuffle` takes any size."""

    def forward(self, x):
        return F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))


class GlobalNormPool(nn.Module):
    """``(N, C, H, W) -> (N, C)``: each channel's L2 norm over the positions. 1-Lipschitz in L2, since
    ``| ||a_c|| - ||b_c|| | <= ||a_c - b_c||`` per channel, and gradient-norm preserving, unlike an
    average (norm 1/sqrt(HW) on the mean direction, 0 on the rest). Computed as the square root of a
    sum of squares, the order :mod:`gmcert.bounds.rounding` bounds; floored at 1e-15 (the sum at
    1e-30) so that the gradient of an all-zero channel is 0, not NaN: ``max(||x_c||, 1e-15)`` is still
    1-Lipschitz, and the floor (a clamp) is exact in floating point."""

    def forward(self, x):
        return x.square().sum((2, 3)).clamp_min(1e-30).sqrt()


def _orthonormal(a):
    """``a``'s Q factor (QR, signs fixed by R's diagonal): orthonormal columns, or rows when ``a`` is wide."""
    wide = a.shape[0] < a.shape[1]
    q, r = torch.linalg.qr(a.T if wide else a)
    q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
    return q.T if wide else q


def _compose(a, b):
    """The kernel of ``b``'s conv after ``a``'s (cross-correlations; full convolution of the taps)."""
    kh, kw = b.shape[-2:]
    return F.conv2d(a.transpose(0, 1), b.flip(-1, -2), padding=(kh - 1, kw - 1)).transpose(0, 1)


class BlockOrthogonal(nn.Module):
    """An orthogonal k x k conv kernel (BCOP, Li et al. 2019): an orthogonal ``c x c`` matrix composed
    with k - 1 two-tap convs ``[P, I - P]`` along H and k - 1 along W, each P a symmetric projector
    ``U U^T`` of rank c/2. Each two-tap conv's symbol ``P + (I - P) e^{-i w}`` is unitary at every
    frequency, so the circular conv is orthogonal at every input size and a zero-padded one (its
    restriction) has norm at most 1. ``c = max(c_in, c_out)``; the kernel is the ``c_out x c_in``
    corner (a selection and an embedding: norm at most 1).

    The parametrised tensor is the packed matrix and projector factors (``unsafe``: its shape is not
    the kernel's), so every trained parameter reaches the kernel (DistributedDataParallel needs that).
    """

    def __init__(self, c_out, c_in, k):
        super().__init__()
        self.shape, self.c = (c_out, c_in, k), max(c_out, c_in)

    def right_inverse(self, weight):
        """A random orthogonal start (drawn from torch's generator), whatever ``weight`` held."""
        c, k = self.c, self.shape[2]
        matrix = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
        factors = torch.randn(2 * (k - 1) * c * max(c // 2, 1), dtype=torch.float64) / c ** 0.5
        return torch.cat((matrix.flatten(), factors)).to(weight)

    def forward(self, packed):
        (c_out, c_in, k), c = self.shape, self.c
        kernel = _orthonormal(packed[:c * c].view(c, c))[:, :, None, None]
        eye = torch.eye(c, dtype=kernel.dtype, device=kernel.device)
        for i, u in enumerate(packed[c * c:].view(2 * (k - 1), c, max(c // 2, 1))):
            q = _orthonormal(u)
            p = q @ q.T
            taps = torch.stack((p, eye - p), -1)[:, :, :, None]  # (c, c, 2, 1): along H
            kernel = _compose(kernel, taps if i % 2 == 0 else taps.transpose(2, 3))
        return kernel[:c_out, :c_in].contiguous()  # stored as computed: the same layout a loaded file has


class Orthonormal(nn.Module):
    """A 1x1 conv weight ``(c_out, c_in, 1, 1)`` with orthonormal rows (or columns, when c_out > c_in):
    the Q factor of a QR decomposition, signs fixed by R's diagonal. Norm 1."""

    def forward(self, p):
        return _orthonormal(p.flatten(1)).reshape(p.shape).contiguous()


class LipschitzConvNet(TimmModel):
    """The convolutional 1-Lipschitz student (module docstring).

    Parameters
    ----------
    in_chans : int, default 1
    num_classes : int, default 1000
        Classifier over the latents (not part of the encoder); 0 for none.
    width : int, default 16
        Channels of the first stage (even, for MaxMin); stage s has ``width * 2**s``.
    depth : int, default 2
        3x3 convs (each followed by MaxMin) per stage.
    stages : int, default 3
        Downsamplings by 2 (pixel-unshuffle); the last stage's output has ``width * 2**stages`` channels.
    latent_dim : int, default 64
    padding_mode : {"zeros", "circular"}, default "zeros"
    """

    def __init__(self, in_chans=1, num_classes=1000, width=16, depth=2, stages=3, latent_dim=64,
                 padding_mode="zeros"):
        super().__init__()
        if int(width) < 2 or int(width) % 2 or int(depth) < 0 or int(stages) < 0:
            raise ValueError(f"width must be even and >= 2, depth and stages >= 0; got {width}, {depth}, {stages}")
        conv = dict(kernel_size=3, padding=1, padding_mode=padding_mode)
        self.model_args = {"width": int(width), "depth": int(depth)}  # what --width and --depth chose
        c = int(width)
        layers = [nn.Conv2d(int(in_chans), c, **conv), GroupSort()]
        for _ in range(int(stages)):
            for _ in range(int(depth)):
                layers += [nn.Conv2d(c, c, **conv), GroupSort()]
            layers += [PadToEven(), nn.PixelUnshuffle(2), nn.Conv2d(4 * c, 2 * c, 1)]
            c *= 2
        for _ in range(int(depth)):
            layers += [nn.Conv2d(c, c, **conv), GroupSort()]
        self.features = nn.Sequential(*layers)
        self.pool, self.flatten = GlobalNormPool(), nn.Identity()
        self.latent = nn.Linear(c, int(latent_dim))
        self.num_features, self.num_classes = int(latent_dim), int(num_classes)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.latent(self.pool(x))
        return x if pre_logits else self.classifier(x)

    def lipschitz_layers(self):
        """The layers :meth:`constrain` parametrises (the classifier is not part of the encoder)."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)] + [self.latent]

    def constrain(self):
        """Register the training-time parametrisations (module docstring); ``gmcert.train`` removes them
        with ``leave_parametrized=True`` before the weights are stored."""
        from torch.nn.utils import parametrize
        from torch.nn.utils.parametrizations import orthogonal

        for layer in self.lipschitz_layers():
            if isinstance(layer, nn.Linear):
                orthogonal(layer, orthogonal_map="cayley")
            elif layer.kernel_size == (1, 1):  # torch's orthogonal() would treat (out, in, 1, 1) as 1x1 matrices
                parametrize.register_parametrization(layer, "weight", Orthonormal())
            else:
                parametrize.register_parametrization(
                    layer, "weight", BlockOrthogonal(layer.out_channels, layer.in_channels, layer.kernel_size[0]),
                    unsafe=True)
        return self


def _create(name, pretrained=False, in_chans=1, num_classes=1000, width=None, depth=None, stages=3, latent_dim=64,
            padding_mode="zeros", **_timm_kwargs):
    default_width, default_depth = SIZES[name]
    model = LipschitzConvNet(in_chans=in_chans, num_classes=num_classes, width=width or default_width,
                             depth=default_depth if depth is None else depth, stages=stages, latent_dim=latent_dim,
                             padding_mode=padding_mode)
    return built(model, name, pretrained, in_chans, 1.0, "train it with `gmcert train --student lipschitz`")


@register_model
def gmcert_lipconv_small(pretrained=False, **kwargs):
    """16-32-64-128 channels, 2 convs per stage, 64 latents: 0.44M stored weights (0.18M trained factors)."""
    return _create("gmcert_lipconv_small", pretrained, **kwargs)


@register_model
def gmcert_lipconv_medium(pretrained=False, **kwargs):
    """32-64-128-256 channels, 3 convs per stage, 64 latents: 2.5M stored weights (0.98M trained factors)."""
    return _create("gmcert_lipconv_medium", pretrained, **kwargs)

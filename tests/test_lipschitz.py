"""Lipschitz kinds: exact for linear maps, sound bounds that a sampled lower estimate never beats."""
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import create_conv2d
from torch import nn

from gmcert.data import Resize, load_dataset
from gmcert.encoders.cards import EncoderCard, load_encoder
from gmcert.errors import DataError
from gmcert.bounds.lipschitz import (LipschitzUnsupportedError, jacobian_norms, layer_bounds, lipschitz_constant,
                              spectral_bound)
from gmcert.encoders.projection import PCAProjection


def _linear_norm(module, shape, iters=300):
    """Power iteration on the linear part of an affine module, float64: converges from BELOW."""
    module = module.double().eval()
    zero = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        offset = module(zero)
    x = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(iters):
        x = (x / x.norm()).requires_grad_(True)
        y = module(x) - offset
        (x,) = torch.autograd.grad(y, x, y)
    x = x / x.norm()
    with torch.no_grad():
        return float((module(x) - offset).norm())


def _bn(channels, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    bn.running_mean.copy_(torch.randn(channels, generator=gen))
    bn.running_var.copy_(torch.rand(channels, generator=gen) * 3 + 0.1)
    bn.weight.data.copy_(torch.randn(channels, generator=gen))
    return bn


LAYERS = [
    ("conv3x3", lambda: nn.Conv2d(3, 8, 3, padding=1), (3, 9, 7)),
    ("conv_stride2", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 10, 8)),
    ("depthwise_stride2", lambda: nn.Conv2d(6, 6, 3, stride=2, groups=6), (6, 9, 9)),
    ("depthwise5x5", lambda: nn.Conv2d(6, 6, 5, padding=2, groups=6), (6, 8, 8)),
    ("dilated_grouped", lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), (4, 6, 6)),
    ("conv1x1", lambda: nn.Conv2d(4, 8, 1), (4, 5, 5)),
    ("conv_bn_folded", lambda: nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), _bn(5, 1)), (3, 7, 7)),
    ("tf_same_stride2", lambda: nn.Sequential(create_conv2d(3, 6, 3, stride=2, padding="same"), _bn(6, 2)),
     (3, 11, 9)),
    ("avgpool", lambda: nn.AvgPool2d(2), (2, 8, 6)),
    ("linear_bn", lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 7)), (3, 2, 2)),
]


@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_single_layer_bound_is_sound_and_tight(name, make, shape):
    torch.manual_seed(0)
    module = make().eval()
    bound = spectral_bound(module, shape)
    true = _linear_norm(module, shape)
    assert true <= bound * (1 + 1e-9)
    assert bound / 2 < true  # a halved bound would be caught: the test can fail


def test_real_lite0_layers_with_folded_batchnorm():
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    for conv_bn, shape in [((net.conv_stem, net.bn1), (3, 17, 16)),
                           ((net.blocks[1][0].conv_dw, net.blocks[1][0].bn2), (96, 9, 9)),
                           ((net.blocks[3][1].conv_dw, net.blocks[3][1].bn2), (480, 2, 2)),
                           ((net.blocks[4][0].conv_dw, net.blocks[4][0].bn2), (480, 3, 3))]:
        conv, bn_act = conv_bn
        bn = _bn(bn_act.num_features, 3)
        bn.eps = bn_act.eps
        module = nn.Sequential(conv, bn).eval()
        bound, true = spectral_bound(module, shape), _linear_norm(module, shape, iters=60)
        assert bound / 2 < true <= bound * (1 + 1e-9), (conv, bound, true)


@pytest.mark.parametrize("size_in, size_out, mode", [((8, 8), (20, 12), "bilinear"), ((16, 12), (7, 9), "bilinear"),
                                                     ((8, 16), (12, 10), "bicubic"), ((6, 6), (11, 4), "nearest")])
def test_resize_norm_equals_full_matrix_norm(size_in, size_out, mode):
    dim = size_in[0] * size_in[1]
    basis = torch.eye(dim, dtype=torch.float64).view(dim, 1, *size_in)
    shrink = size_out[0] < size_in[0] or size_out[1] < size_in[1]
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": shrink}
    matrix = F.interpolate(basis, size=size_out, mode=mode, **kwargs).reshape(dim, -1)
    exact = float(torch.linalg.matrix_norm(matrix, ord=2))
    bound = spectral_bound(Resize(size_out, mode), (1, *size_in))
    assert exact <= bound <= exact * (1 + 1e-6)


def _max_jacobian_norm(module, points):
    """Exact per-point Jacobian spectral norms (small inputs): a lower bound on L."""
    norms = []
    for p in points:
        jac = torch.autograd.functional.jacobian(lambda z: module(z[None])[0], p)
        norms.append(np.linalg.norm(jac.reshape(jac.shape[0], -1).double().numpy(), 2))
    return max(norms)


def _net(nonnegative):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
              nn.AvgPool2d(2) if nonnegative else nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU6(),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)]
    net = nn.Sequential(*layers).eval()
    if nonnegative:  # all maps positive, so every ReLU is active and the top singular vectors align
        for p in net.parameters():
            p.data.uniform_(0.05, 0.3)
    else:
        net[1].running_var.uniform_(0.1, 2.0)
    return net


def test_bound_beats_sampled_jacobians_of_small_conv_nets():
    points = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    signed, positive = _net(False), _net(True)
    assert _max_jacobian_norm(signed, points) <= spectral_bound(signed, (3, 8, 8))
    sampled, bound = _max_jacobian_norm(positive, points), spectral_bound(positive, (3, 8, 8))
    assert bound / 2 < sampled <= bound  # near-tight net: a halved bound would fail here


def test_residual_block_bound_is_sound_and_tight():
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    torch.manual_seed(0)
    block = DepthwiseSeparableConv(4, 4, dw_kernel_size=3)
    assert block.has_skip
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), block, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for p in net.parameters():  # positive maps: ReLUs active, the identity and body directions align
        p.data.uniform_(0.05, 0.3)
    points = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sampled, bound = _max_jacobian_norm(net.eval(), points), spectral_bound(net, (3, 8, 8))
    assert bound / 2 < sampled <= bound  # dropping the "1 +" of the residual rule would fail here


def test_bound_beats_sampled_jacobians_of_small_input_lite0_encoder():
    torch.manual_seed(0)
    card = EncoderCard(name="lite0_small", architecture="tf_efficientnet_lite0", input_size=(3, 32, 32),
                       mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", feature_dim=1280)
    encoder = load_encoder(card, pretrained=False)
    gen = torch.Generator().manual_seed(2)
    points = torch.rand(8, 3, 12, 12, generator=gen)
    sampled = jacobian_norms(encoder, points, iterations=6).max()
    layers = layer_bounds(encoder, (3, 12, 12))
    names = [name for name, _ in layers]
    assert names[0].endswith("resize") and names[1].endswith("normalize") and layers[1][1] == pytest.approx(4.0)
    residual = dict(layers)[f"{names[2].split('.')[0]}.network.blocks.1.1"]  # 1 + L(body), reported whole
    assert residual > 1.0
    bound = math.prod(value for _, value in layers)
    assert sampled > 0.1 and np.isfinite(bound) and sampled <= bound
    # Secants are lower bounds on the global constant too, without any autograd.
    with torch.no_grad():
        deltas = 1e-2 * torch.randn(points.shape, generator=gen)
        secants = (encoder(points + deltas) - encoder(points)).norm(dim=1) / deltas.flatten(1).norm(dim=1)
    assert float(secants.max()) <= bound
    value, kind = lipschitz_constant(encoder, "estimate", x=points[0], n_batches=4, batch_size=4, iterations=3)
    assert kind == "estimate" and np.isfinite(value) and value > 0


def test_raw_pixel_pca_is_exactly_one_lipschitz_and_attacks_cannot_exceed_it():
    images = load_dataset("digits", channels=None).images
    pca = PCAProjection(10).fit(images.flatten(1).double().numpy())
    module = pca.to_torch(torch.float64)
    L, kind = lipschitz_constant(module, "exact", input_shape=(1, 8, 8))
    assert kind == "exact" and L == pytest.approx(1.0, abs=1e-12)
    x = images[:8].double()
    delta = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    delta.requires_grad_(True)
    optimiser = torch.optim.Adam([delta], lr=0.05)
    for _ in range(100):  # attack: maximise the latent/input distance ratio
        ratio = (module(x + delta) - module(x)).norm(dim=1) / delta.flatten(1).norm(dim=1)
        optimiser.zero_grad()
        (-ratio.sum()).backward()
        optimiser.step()
    ratio = ((module(x + delta) - module(x)).norm(dim=1) / delta.flatten(1).norm(dim=1)).detach()
    assert float(ratio.max()) <= L * (1 + 1e-12)
    assert float(ratio.min()) > 0.99  # the attack does reach the constant: L = 1 is exact, not loose


def test_general_linear_map_reports_its_spectral_norm_as_a_bound():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    L, kind = lipschitz_constant(module, "exact", input_shape=(3, 2, 2))
    assert kind == "bound"
    assert L == pytest.approx(np.linalg.norm(module[1].weight.detach().double().numpy(), 2), rel=1e-7)
    with pytest.raises(DataError, match="not linear"):
        lipschitz_constant(_net(False), "exact", input_shape=(3, 8, 8))


def test_unsupported_modules_and_bad_calls_raise():
    class ScaledConv(nn.Conv2d):  # a subclass may change forward: never trusted silently
        def forward(self, x):
            return 10 * super().forward(x)

    for module in (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), nn.Sequential(ScaledConv(3, 4, 3))):
        with pytest.raises(LipschitzUnsupportedError, match="estimate"):
            lipschitz_constant(module.eval(), "bound", input_shape=(3, 8, 8))
    with pytest.raises(DataError, match="eval"):
        spectral_bound(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), (3, 8, 8))
    with pytest.raises(DataError, match="kind"):
        lipschitz_constant(nn.Identity(), "guess", input_shape=(1, 2, 2))
    with pytest.raises(DataError, match="input x"):
        lipschitz_constant(nn.Identity(), "estimate")

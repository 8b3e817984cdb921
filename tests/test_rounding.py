"""Forward rounding-error bounds: a float32 pass stays within its bound of the float64 pass, every layer
counts, and the bound is not vacuous on nets whose Lipschitz bound is not."""
import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_conv2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from torch import nn

from gmcert.data import Resize
from gmcert.encoders.cards import Encoder, EncoderCard, load_encoder
from gmcert.errors import DataError
from gmcert.bounds.lipschitz import LipschitzUnsupportedError, _groups, _traced_ops, spectral_bound
from gmcert.encoders.projection import PCAProjection
from gmcert.bounds.rounding import ForwardErrorBound, exact_interpolation_weights, gamma, standard_arithmetic

U32 = 2.0 ** -24


def _both(module, shape, X):
    """(observed ||Z32 - Z64|| (n,), err32, err64, the float64 ForwardErrorBound)."""
    b64, b32 = ForwardErrorBound(module, shape), ForwardErrorBound(module, shape, dtype=torch.float32)
    (Z64, err64), (Z32, err32) = b64(X, batch_size=5), b32(X)
    return np.linalg.norm(Z32 - Z64, axis=1), err32, err64, b64


def _random_bn(bn, seed):
    gen = torch.Generator().manual_seed(seed)
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 2 + 0.2)
    bn.weight.data.copy_(torch.randn(bn.num_features, generator=gen))
    bn.bias.data.copy_(torch.randn(bn.num_features, generator=gen))
    return bn


def _unit_layers(module, shape):
    """Scale each conv / linear so that its BatchNorm-folded bound is 1: deep, yet L is not vacuous."""
    def walk(groups):
        for g in groups:
            walk(g.body)
            if g.op.kind in ("conv", "linear"):
                g.op.module.weight.data /= g.value
    walk(_groups(_traced_ops(module, shape)))
    return module


def _small_cnn():
    torch.manual_seed(0)
    block = DepthwiseSeparableConv(8, 8, dw_kernel_size=3)  # residual, BatchNormAct2d, depthwise
    _random_bn(block.bn1, 1), _random_bn(block.bn2, 2)
    net = nn.Sequential(Resize((16, 16), "bicubic"), nn.Conv2d(3, 8, 3, padding=1), _random_bn(nn.BatchNorm2d(8), 3),
                        nn.ReLU(), block, nn.AvgPool2d(2),
                        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2), _random_bn(nn.BatchNorm2d(8), 4),
                        nn.SiLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return _unit_layers(net.eval(), (3, 20, 20))


def _orthogonal_chain(depth, width=64, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Flatten()]
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.orthogonal_(linear.weight)
        nn.init.uniform_(linear.bias, -0.1, 0.1)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers).eval()


def _stages(module, shape, X):
    """Per top-level group: (name, observed ||y32 - y64||, err32, err64), stepping both passes side by side."""
    b64, b32 = ForwardErrorBound(module, shape), ForwardErrorBound(module, shape, dtype=torch.float32)
    out, zero = [], torch.zeros(len(X), dtype=torch.float64)
    with standard_arithmetic():
        (y64, e64), (y32, e32) = (X.double(), zero), (X.float(), zero)
        for s64, s32 in zip(b64._steps, b32._steps):  # internal: the bound after every layer, not only the last
            (y64, e64), (y32, e32) = s64(y64, e64), s32(y32, e32)
            observed = (y32.double() - y64).flatten(1).norm(dim=1).numpy()
            out.append((s64.op.name, observed, e32.numpy(), e64.numpy()))
    return out, b64


def test_float32_pass_stays_within_its_bound_on_a_small_cnn():
    X = torch.rand(12, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    stages, bound = _stages(_small_cnn(), (3, 20, 20), X)
    assert bound.lipschitz == spectral_bound(_small_cnn(), (3, 20, 20))
    for name, observed, err32, err64 in stages:
        assert np.all(observed <= err32 + err64), name
        assert observed.max() > 1e-4 * err32.max(), name  # not vacuous: L is 2 here
    assert all(np.all(err64 < 1e-8 * err32) for _, _, err32, err64 in stages)  # the same analysis at 2^-53
    for name, observed, err32, _ in stages[:3]:  # before the bound's worst case compounds: tight
        assert observed.max() > 5e-3 * err32.max(), name


def test_float32_pass_stays_within_its_bound_on_a_lite0_card():
    card = EncoderCard(name="lite0_small", architecture="tf_efficientnet_lite0", input_size=(3, 16, 16),
                       mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic", feature_dim=1280)
    encoder = load_encoder(card, pretrained=False)  # resize 12 -> 16, normalise, lite0 (random init)
    X = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    stages, bound = _stages(encoder, (3, 12, 12), X)
    assert bound.lipschitz == spectral_bound(encoder, (3, 12, 12))
    assert [name.rsplit(".", 1)[-1] for name, *_ in stages[:3]] == ["resize", "normalize", "conv_stem"]
    for name, observed, err32, err64 in stages:  # sound after every layer ...
        assert np.all(observed <= err32 + err64), name
    for name, observed, err32, _ in stages[:3]:  # ... and tight until L's worst case compounds (L ~ 1e26)
        assert observed.max() > 5e-3 * err32.max(), name


def test_float32_pass_stays_within_its_bound_on_a_projection():
    Z = np.random.default_rng(0).normal(size=(200, 48)) * 3 + 1
    layer = PCAProjection(8).fit(Z).to_torch(torch.float32)
    X = torch.as_tensor(Z[:20], dtype=torch.float32).view(20, 3, 4, 4)
    observed, err32, err64, _ = _both(layer, (3, 4, 4), X)
    assert np.all(observed <= err32 + err64) and observed.max() > 1e-3 * err32.max()


@pytest.mark.parametrize("size_in, size_out, mode", [((20, 18), (9, 7), "bicubic"), ((9, 7), (20, 25), "bilinear"),
                                                     ((9, 9), (32, 32), "bicubic"), ((33, 30), (12, 30), "bilinear")])
def test_resize_uses_torchs_exact_weights_and_bounds_their_rounding(size_in, size_out, mode):
    shrink = size_out[0] < size_in[0] or size_out[1] < size_in[1]
    for n_in, n_out in zip(size_in, size_out):  # torch's float64 weights are our exact ones, rounded
        eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1).expand(-1, -1, -1, 2).contiguous()
        torch_w = F.interpolate(eye, size=(n_out, 2), mode=mode, align_corners=False, antialias=shrink)[:, 0, :, 0].T
        exact = exact_interpolation_weights(n_in, n_out, mode, shrink)
        gap = max(abs(Fraction(float(torch_w[i, j])) - row.get(j, 0))
                  for i, row in enumerate(exact) for j in range(n_in))
        assert gap < 1e-12
    X = torch.rand(4, 3, *size_in, generator=torch.Generator().manual_seed(3))
    observed, err32, err64, _ = _both(nn.Sequential(Resize(size_out, mode)), (3, *size_in), X)
    assert np.all(observed <= err32 + err64) and observed.max() > 1e-2 * err32.max()


def _bn_far_from_zero(channels):  # (x - 1000) s + beta: a cancellation, float32 errs by about u 1000
    bn = _random_bn(nn.BatchNorm2d(channels), 7)
    bn.running_mean.fill_(1000.0)
    return bn


def _bn_offset(channels):  # output near beta = 1000: float32 errs by about u 1000 in the folded bias
    bn = _random_bn(nn.BatchNorm2d(channels), 10)
    bn.bias.data.fill_(1000.0)
    return bn


def _normalize_only():
    card = EncoderCard(name="norm", architecture="none", input_size=(3, 8, 8), mean=(0.3, 0.5, 0.7),
                       std=(0.2, 0.3, 0.1), interpolation="bilinear", feature_dim=1)
    return Encoder(nn.Identity(), card, "random-init", 1)


SINGLE_OPS = [
    ("conv", lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 8, 8), -2.0),
    ("depthwise_same_stride2", lambda: create_conv2d(6, 6, 5, stride=2, padding="same", depthwise=True), (6, 9, 9),
     -2.0),
    ("conv_bn", lambda: nn.Sequential(nn.Conv2d(4, 4, 3), _random_bn(nn.BatchNorm2d(4), 8)), (4, 8, 8), 0.0),
    ("conv_bn_offset", lambda: nn.Sequential(nn.Conv2d(4, 4, 3), _bn_offset(4)), (4, 8, 8), -2.0),
    ("bn_cancellation", lambda: _bn_far_from_zero(4), (4, 6, 6), 1000.0),
    ("normalize", _normalize_only, (3, 8, 8), 0.0),
    ("silu", nn.SiLU, (4, 6, 6), -0.5), ("gelu", nn.GELU, (4, 6, 6), -0.5), ("sigmoid", nn.Sigmoid, (4, 6, 6), -0.5),
    ("avgpool", lambda: nn.AvgPool2d(3, stride=2, padding=1), (4, 9, 9), 0.0),
    ("global_avg", lambda: nn.AdaptiveAvgPool2d(1), (4, 32, 32), 0.0),
    ("linear", lambda: nn.Sequential(nn.Flatten(), nn.Linear(96, 10)), (6, 4, 4), -2.0),
    ("resize", lambda: Resize((9, 13), "bicubic"), (3, 20, 20), 0.0),
]


@pytest.mark.parametrize("name, make, shape, offset", SINGLE_OPS, ids=[c[0] for c in SINGLE_OPS])
def test_each_op_alone_stays_within_its_bound_and_near_it(name, make, shape, offset):
    torch.manual_seed(0)
    X = offset + 4 * torch.rand(8, *shape, generator=torch.Generator().manual_seed(8))
    observed, err32, err64, _ = _both(nn.Sequential(make()).eval(), shape, X)
    assert np.all(observed <= err32 + err64)
    assert observed.max() > 1e-3 * err32.max()  # a bound that ignored this op's rounding would be 0


def test_input_error_goes_through_L_and_through_the_skip_of_a_residual():
    gain = nn.Linear(16, 16, bias=False)  # 1024 I: exact products, so the error is the amplified input error
    gain.weight.data.copy_(1024 * torch.eye(16))
    block = DepthwiseSeparableConv(4, 4, dw_kernel_size=3)  # body near 0: the error must pass the skip
    for p in block.parameters():
        p.data.mul_(1e-3)
    X = 1000 + torch.rand(8, 4, 2, 2, generator=torch.Generator().manual_seed(9))
    for net in (nn.Sequential(_bn_far_from_zero(4), nn.Flatten(), gain), nn.Sequential(_bn_far_from_zero(4), block)):
        observed, err32, err64, _ = _both(net.eval(), (4, 2, 2), X)
        assert np.all(observed <= err32 + err64)


def test_the_bound_of_affine_layers_sees_only_magnitudes():
    torch.manual_seed(0)  # gamma_k (|W||x| + |b|): x and |x| get the same bound, cancellations or not
    X = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(12))
    for layer in (nn.Conv2d(4, 4, 3), create_conv2d(4, 4, 3, depthwise=True),
                  nn.Sequential(nn.Flatten(), nn.Linear(144, 5))):
        bound = ForwardErrorBound(nn.Sequential(layer).eval(), (4, 6, 6))
        assert np.array_equal(bound(X)[1], bound(X.abs())[1])


def test_inputs_the_pass_cannot_hold_count_as_input_error():
    X = torch.rand(6, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    net = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))  # exact ops: the float32 pass errs by rounding X only
    (Z32, err32), (Z64, _) = (ForwardErrorBound(net, (2, 6, 6), dtype=t)(X) for t in (torch.float32, torch.float64))
    observed = np.linalg.norm(Z32 - Z64, axis=1)
    assert np.all(observed <= err32) and np.all(observed > 0.1 * err32)


def test_near_isometric_net_gets_a_tiny_float64_bound():
    net = _orthogonal_chain(6)
    X = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    X /= X.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    bound = ForwardErrorBound(net, (1, 8, 8))
    _, err = bound(X)
    assert abs(bound.lipschitz - 1.0) < 1e-5
    assert np.all(err < 1e-12) and np.all(err > 0)


def test_output_is_the_float64_module_output_and_the_callers_module_is_untouched():
    net = _small_cnn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    X = torch.rand(7, 3, 20, 20, generator=torch.Generator().manual_seed(5))
    Z, err = ForwardErrorBound(net, (3, 20, 20))(X, batch_size=3)
    with torch.no_grad():
        reference = copy.deepcopy(net).double()(X.double()).numpy()
    # Depthwise convs and the resize run tap by tap (another rounding order than torch's kernels).
    assert np.all(np.linalg.norm(Z - reference, axis=1) <= 2 * err) and np.abs(Z - reference).max() < 1e-13
    plain = _orthogonal_chain(3)  # torch's own kernels throughout: bit for bit
    X = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        reference = copy.deepcopy(plain).double()(X.double()).numpy()
    assert np.array_equal(ForwardErrorBound(plain, (1, 8, 8))(X)[0], reference)
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not net.training and next(net.parameters()).dtype == torch.float32


def test_every_layer_adds_its_own_rounding():
    net = _orthogonal_chain(4)
    X = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    errs = [ForwardErrorBound(net[:1 + 2 * d], (1, 8, 8), dtype=torch.float32)(X)[1] for d in range(1, 5)]
    with torch.no_grad():
        for d in range(1, 4):  # layer d + 1's own worst case, gamma_k |W||x| + |b|, must be added on top
            x, linear = net[:1 + 2 * d](X), net[1 + 2 * d]
            own = gamma(64, U32) * (x.abs() @ linear.weight.abs().T + linear.bias.abs()).norm(dim=1).numpy()
            assert np.all(errs[d] - errs[d - 1] >= 0.9 * own)


def test_long_sums_are_bounded_by_their_fan_in():
    observed, err = {}, {}
    for k in (256, 16384):
        linear = nn.Linear(k, 1, bias=False)
        linear.weight.data.fill_(1.0)
        X = torch.full((1, 1, 1, k), 0.1)  # 0.1 is not a float: every addition rounds, mostly one way
        observed[k], err[k], _, _ = _both(nn.Sequential(nn.Flatten(), linear).eval(), (1, 1, k), X)
    assert observed[16384] <= err[16384]
    # The bound must hold whatever order the kernel adds in. This machine's BLAS may add in blocks
    # (an error like log(k) u); a left-to-right float32 sum, as other kernels and devices run it,
    # reaches an error that a bound growing like sqrt(k) u would not cover.
    terms = np.full(16384, np.float32(0.1), dtype=np.float32)
    in_order = abs(float(np.add.accumulate(terms, dtype=np.float32)[-1]) - float(terms.astype(np.float64).sum()))
    assert in_order <= err[16384]
    assert in_order > 1e-2 * err[16384]
    assert err[16384] / err[256] > 0.9 * (16384 / 256) ** 2  # gamma_k |W||x|: k u times a sum of k terms


def test_refuses_what_it_cannot_bound():
    with pytest.raises(LipschitzUnsupportedError):
        ForwardErrorBound(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)).eval(), (3, 8, 8))
    layer64 = PCAProjection(3).fit(np.random.default_rng(1).normal(size=(50, 12))).to_torch(torch.float64)
    with pytest.raises(DataError, match="float64"):  # a float32 pass would round the module's own weights
        ForwardErrorBound(layer64, (3, 2, 2), dtype=torch.float32)
    with pytest.raises(DataError, match="dtype"):
        ForwardErrorBound(layer64, (3, 2, 2), dtype=torch.float16)
    with pytest.raises(DataError, match="shape"):
        ForwardErrorBound(layer64, (3, 2, 2))(torch.zeros(2, 3, 4, 4))

"""Convolutional 1-Lipschitz students (gmcert/networks/lipconv.py): every layer's bound holds against
the exact norm of its dense matrix, a wrong bound would not, the whole network's bound holds
against the largest stretch an attack finds, radii from it survive PGD, the rounding bound of the
float64 pass holds against float32, and a card round trip keeps predictions and bound."""
import math
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from attacks import attack
from test_rounding import _stages
from gmcert.encoders.cards import file_sha256, load_card, load_encoder
from gmcert.bounds.convnorm import conv_operator_norm
from gmcert.networks.lipconv import GlobalNormPool, LipschitzConvNet, PadToEven
from gmcert.bounds.lipschitz import LipschitzUnsupportedError, layer_bounds, spectral_bound
from gmcert.bounds.rounding import ForwardErrorBound, standard_arithmetic
from gmcert.networks.small import GroupSort
from gmcert.errors import ModelFileError
from gmcert.train.workflow import _toml

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dense_norm(module, shape):
    """The exact spectral norm of a linear (affine) module on ``shape`` inputs: SVD of its matrix."""
    module = module.double().eval()
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        matrix = (module(basis) - module(torch.zeros(1, *shape, dtype=torch.float64))).reshape(n, -1)
    return float(torch.linalg.svdvals(matrix)[0])


#: (in, out, kernel, stride, padding, groups, dilation, padding mode, input shape): the students' own
#: convs (3x3 stride 1 pad 1, zeros or circular; 1x1) and what the tracer accepts besides
CONVS = [(2, 3, 3, 1, 1, 1, 1, "zeros", (2, 5, 7)), (1, 4, 3, 1, 1, 1, 1, "zeros", (1, 6, 6)),
         (2, 4, 3, 2, 1, 1, 1, "zeros", (2, 5, 7)), (4, 4, 3, 1, 1, 2, 1, "zeros", (4, 6, 6)),
         (4, 2, 3, 1, 2, 2, 2, "zeros", (4, 6, 6)), (4, 4, 3, 2, 0, 4, 1, "zeros", (4, 7, 5)),
         (2, 3, 2, 2, 0, 1, 1, "zeros", (2, 5, 7)), (8, 4, 1, 1, 0, 1, 1, "zeros", (8, 3, 3)),
         (2, 3, 3, 1, 1, 1, 1, "circular", (2, 5, 7)), (2, 4, 3, 2, 1, 1, 1, "circular", (2, 6, 6)),
         (4, 4, 3, 1, 1, 2, 1, "circular", (4, 6, 6)), (2, 2, 3, 1, 0, 1, 1, "circular", (2, 5, 4))]


@pytest.mark.parametrize("c_in, c_out, k, stride, padding, groups, dilation, mode, shape", CONVS)
def test_conv_bound_holds_against_the_dense_matrix(c_in, c_out, k, stride, padding, groups, dilation, mode, shape):
    for seed in range(3):
        torch.manual_seed(seed)
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, groups=groups, dilation=dilation,
                         padding_mode=mode)
        exact, ((_, bound),) = _dense_norm(conv, shape), layer_bounds(conv, shape)
        assert bound >= exact * (1 + 1e-9), (seed, bound, exact)
        full = mode == "circular" and 2 * padding == dilation * (k - 1)  # every row of the circular conv
        if full or k == 1 or (k == stride and padding == 0):  # exact there: the DFT is the matrix
            assert bound <= exact * (1 + 1e-7), (seed, bound, exact)
        else:  # an upper bound from the padded grid, not a loose one
            assert bound <= exact * 1.6, (seed, bound, exact)


def test_wrong_conv_bounds_would_fail_the_dense_check():
    # ignoring the stride's aliases (a stride-2 conv's norm taken as the stride-1 norm / 2)
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
    w = conv.weight.double()
    wrong = conv_operator_norm(w, (5, 7), (1, 1), (2, 2)) / 2
    assert wrong < _dense_norm(conv, (2, 5, 7)) * 0.9
    # ignoring zero padding (the circular spectrum of the unpadded grid): differences [1, -1] on 5 pixels
    diff = nn.Conv2d(1, 1, (1, 2), padding=(0, 1), bias=False)
    with torch.no_grad():
        diff.weight.copy_(torch.tensor([[[[1.0, -1.0]]]]))
    exact = _dense_norm(diff, (1, 1, 5))
    assert exact == pytest.approx(2 * math.cos(math.pi / 12), rel=1e-9)
    assert conv_operator_norm(diff.weight, (1, 5), circular=True) < exact * 0.99
    assert layer_bounds(diff, (1, 1, 5))[0][1] >= exact


def test_circular_convs_the_grid_cannot_hold_are_refused():
    conv = nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="circular")
    with pytest.raises(LipschitzUnsupportedError, match="circular"):
        layer_bounds(conv, (2, 5, 6))
    with pytest.raises(LipschitzUnsupportedError, match="circular"):
        layer_bounds(nn.Conv2d(2, 2, 1, padding=1, padding_mode="circular"), (2, 4, 4))


@pytest.mark.parametrize("module, shape", [(nn.PixelUnshuffle(2), (2, 4, 6)), (PadToEven(), (2, 5, 7)),
                                           (nn.PixelShuffle(2), (4, 3, 3)), (nn.ZeroPad2d((1, 0, 2, 1)), (1, 3, 4))])
def test_isometries_have_norm_one_exactly(module, shape):
    assert layer_bounds(module, shape)[0][1] == 1.0
    assert _dense_norm(module, shape) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("module, shape", [(GroupSort(), (4, 3, 3)), (GlobalNormPool(), (3, 5, 7))])
def test_nonlinear_blocks_are_1_lipschitz(module, shape):
    assert layer_bounds(module, shape)[0][1] == 1.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((256, *shape), generator=gen, dtype=torch.float64)
    d = torch.randn((256, *shape), generator=gen, dtype=torch.float64) * torch.logspace(-6, 0, 256).view(-1, 1, 1, 1)
    d[::2] = x[::2] * torch.logspace(-6, 0, 128).view(-1, 1, 1, 1)  # radial steps: a norm pool's stretch 1
    ratio = (module(x + d) - module(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 1.0 + 1e-8 and float(ratio.max()) > 0.9  # 1e-8: rounding of (x + d) - x


def _student(shape=(2, 5, 7), noise=0.2, seed=0, bake=True, **kwargs):
    """A small constrained student, its parameters moved off their orthogonal init by noise, baked."""
    kwargs = {"width": 4, "depth": 1, "stages": 2, "latent_dim": 8, **kwargs}
    torch.manual_seed(seed)
    net = timm.create_model("gmcert_lipconv_small", in_chans=shape[0], num_classes=0, **kwargs).constrain()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn_like(p))
    if bake:
        for layer in net.lipschitz_layers():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return net.eval()


def _largest_stretch(module, shape, starts=32, steps=60, seed=0):
    """A lower bound on the Lipschitz constant: ||f(x + d) - f(x)|| / ||d|| maximised by Adam."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    x = torch.rand((starts, *shape), generator=gen, dtype=torch.float64).requires_grad_(True)
    d = torch.randn((starts, *shape), generator=gen, dtype=torch.float64)
    d = (d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * torch.logspace(-3, 0, starts, dtype=torch.float64)
         .view(-1, 1, 1, 1)).requires_grad_(True)
    optimizer, best = torch.optim.Adam([x, d], lr=0.01), 0.0
    for _ in range(steps):
        ratio = (module(x + d) - module(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        best = max(best, float(ratio.detach().max()))
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    return best


@pytest.mark.parametrize("shape, kwargs", [((2, 5, 7), {}), ((1, 6, 6), {"padding_mode": "circular"}),
                                           ((3, 9, 8), {"depth": 2, "stages": 3})])
def test_network_bound_holds_against_the_largest_stretch_and_is_not_vacuous(shape, kwargs):
    net = _student(shape, **kwargs)
    bound = spectral_bound(net, shape)
    assert 0.3 < bound <= 1.0 + 1e-4  # the constrained layers keep the product at most 1, up to float32
    stretch = _largest_stretch(net, shape)
    assert stretch <= bound and stretch > 0.2 * bound, (stretch, bound)
    raw = timm.create_model("gmcert_lipconv_small", in_chans=shape[0], num_classes=0, width=4, depth=1, stages=2,
                            **{k: v for k, v in kwargs.items() if k == "padding_mode"}).eval()
    with torch.no_grad():  # an unconstrained net: a bound far from 1, still sound
        for conv in raw.lipschitz_layers():
            conv.weight.normal_()
    assert _largest_stretch(raw, shape) <= spectral_bound(raw, shape)


def test_bound_is_on_the_weights_as_applied_while_parametrised():
    net = _student((2, 5, 7), bake=False)
    baked = _student((2, 5, 7), bake=True)
    assert spectral_bound(net, (2, 5, 7)) == spectral_bound(baked, (2, 5, 7))
    error_bound = ForwardErrorBound(net, (2, 5, 7))  # materialises a copy; the caller's module keeps working
    x = torch.rand(3, 2, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(net(x.float()), baked(x.float()))
    z, err = error_bound(x)
    assert error_bound.lipschitz == spectral_bound(baked, (2, 5, 7))
    assert np.all(np.abs(z - baked.double()(x).detach().numpy()).max(1) <= err)


def test_pgd_finds_no_flip_inside_the_certified_radius():
    shape, n = (2, 5, 7), 24
    net = _student(shape, steps=40)
    head = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    error_bound = ForwardErrorBound(net, shape)
    x = torch.rand((n, *shape), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z, err = error_bound(x)
    scores = torch.as_tensor(z) @ head.T
    pred = scores.argmax(1)
    gaps = (head[pred][:, None, :] - head[None, :, :]).norm(dim=2)  # ||a_i - a_j||, (n, classes)
    margins = scores.gather(1, pred[:, None]) - scores - gaps * torch.as_tensor(err)[:, None]
    radius = (margins / (gaps * error_bound.lipschitz)).masked_fill(gaps == 0, torch.inf).min(1).values.clamp_min(0)
    assert float(radius.min()) > 0
    module = nn.Sequential(net.double(), nn.Linear(8, 4, bias=False).double()).eval()
    with torch.no_grad():
        module[1].weight.copy_(head)
    assert not attack(module, x, pred, radius * 0.999, steps=60, starts=4).any()
    assert attack(module, x, pred, radius * 5, steps=60, starts=4).mean() > 0.5  # measured: all flip at 5x, none at 3x


def test_float32_pass_stays_within_its_rounding_bound():
    shape = (3, 9, 8)
    net = _student(shape, depth=2, stages=3)
    X = torch.rand(8, *shape, generator=torch.Generator().manual_seed(5))
    stages, b64 = _stages(net, shape, X)  # float32 and float64 passes side by side, the bound after every layer
    for name, observed, err32, err64 in stages:
        assert np.all(observed <= err32 + err64), name
        assert np.all(err64 < 1e-8 * err32) and np.all(err64 > 0), name
    for name, observed, err32, _ in stages[:3]:  # before the worst case compounds: near what float32 does
        assert observed.max() > 5e-3 * err32.max(), name
    assert stages[-1][1].max() > 1e-4 * stages[-1][2].max()  # measured: 1.8e-4 after 33 layers
    z64, e64 = b64(X)
    with standard_arithmetic():
        assert np.abs(z64 - net.double()(X.double()).numpy()).max() <= e64.max()


def test_norm_pool_rounding_bound_holds_on_large_and_tiny_values():
    pool = nn.Sequential(GlobalNormPool())
    for scale in (1.0, 1e3, 1e-20):
        X = torch.randn(6, 5, 7, 9, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * scale
        (z64, e64), (z32, e32) = ForwardErrorBound(pool, (5, 7, 9))(X), \
            ForwardErrorBound(pool, (5, 7, 9), dtype=torch.float32)(X.float())
        observed = np.linalg.norm(z32 - z64, axis=1)
        assert np.all(observed <= e32 + e64), scale
        if scale >= 1:  # at 1e-20 the squares underflow in float32: the floor sqrt(N tiny) covers it, loosely
            assert np.all(observed > 1e-3 * e32), scale


@pytest.mark.parametrize("name, in_chans, width, depth", [("gmcert_lipconv_small", 1, None, None),
                                                          ("gmcert_lipconv_medium", 3, 8, 1)])
def test_timm_builds_the_students_at_any_input_size(name, in_chans, width, depth):
    net = timm.create_model(name, in_chans=in_chans, num_classes=5, width=width, depth=depth).eval()
    for h, w in ((6, 6), (5, 7), (13, 9)):
        assert net(torch.rand(2, in_chans, h, w)).shape == (2, 5)
        assert net.forward_head(net.forward_features(torch.rand(1, in_chans, h, w)), pre_logits=True).shape == (1, 64)
    assert isinstance(net, LipschitzConvNet)
    with pytest.raises(ValueError, match="width must be even"):
        timm.create_model(name, width=5)


def test_card_round_trip_keeps_predictions_and_bound_and_refuses_changed_weights(tmp_path):
    card = replace(load_card("gmcert_lipconv"), input_size=(1, 12, 12))
    encoder = load_encoder(card, pretrained=False).eval()
    encoder.network.reset_classifier(0)
    encoder.network.constrain()
    for layer in encoder.network.lipschitz_layers():
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        # contiguous, as the file is: a transposed view of the same numbers convolves with other rounding
        layer.weight = nn.Parameter(layer.weight.detach().contiguous())
    weights = tmp_path / "encoder.safetensors"
    save_file({k: v.detach().contiguous() for k, v in encoder.network.state_dict().items()}, str(weights))
    trained = replace(card, num_classes=0)
    path = tmp_path / "encoder.toml"
    path.write_text(_toml(trained.as_dict(), {"source": "file", "path": weights.name, "mapping": "names",
                                              "sha256": file_sha256(weights)}))
    loaded = load_encoder(str(path)).eval()
    x = torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))
    assert spectral_bound(loaded, (1, 12, 12)) == spectral_bound(encoder, (1, 12, 12)) <= 1.0 + 1e-4
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="sha256"):
        load_encoder(str(path))


def test_train_picks_the_conv_student_above_8x8_and_certifies_from_its_stored_weights(tmp_path):
    from sklearn.datasets import load_digits

    from gmcert.train import TrainConfig, train_model

    digits = load_digits()
    x = torch.as_tensor(digits.images[:300, None] / 16.0, dtype=torch.float32)
    x = torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False).clamp(0, 1)
    np.savez(tmp_path / "digits12.npz", x=x.numpy(), y=digits.target[:300])
    config = TrainConfig(method="margin", student="lipschitz", epochs=6, seed=0)
    pipeline, record = train_model(tmp_path / "model", data=str(tmp_path / "digits12.npz"), config=config,
                                   device="cpu", progress=False)
    card = pipeline.encoder.card
    assert card.architecture == "gmcert_lipconv_small" and tuple(card.input_size) == (1, 12, 12)
    L, kind = pipeline.input_lipschitz()
    assert kind == "bound" and 0.5 < L <= 1.0 + 1e-4  # orthogonal layers, bounded from the stored weights
    assert record["network"]["clean_accuracy"] > 0.6  # six epochs on 225 images: learning, not chance (0.1)
    certs = pipeline.certify(x[:20].numpy())
    assert all(c.radius >= 0 for c in certs) and any(c.radius > 0 for c in certs)


def test_width_and_depth_choose_the_student_and_the_model_records_them(tmp_path, capsys):
    """``gmcert train --width --depth`` build that conv student; the saved card records them, so the
    loaded model is that network; a card whose constructor takes neither is refused (exit 2)."""
    from gmcert.cli import main
    from gmcert.pipeline import Pipeline

    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = np.clip(0.5 + 0.3 * (y[:, None, None, None] - 1) + 0.05 * rng.normal(size=(120, 1, 12, 12)), 0, 1)
    np.savez(tmp_path / "d.npz", x=x.astype(np.float32), y=y)
    out = tmp_path / "m"
    assert main(["train", "--student", "lipschitz", "--data", str(tmp_path / "d.npz"), "--width", "4",
                 "--depth", "1", "--max-steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert "model_args = {width = 4, depth = 1}" in (out / "encoder.toml").read_text()
    network = Pipeline.load(out).encoder.network
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and convs[0].out_channels == 4
    default = LipschitzConvNet(in_chans=1, num_classes=0, width=16, depth=2)
    assert sum(p.numel() for p in network.parameters()) < sum(p.numel() for p in default.parameters())
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--width", "4", "--max-steps", "1",
                 "--device", "cpu", "--out", str(tmp_path / "cnn")]) == 2
    assert "takes no --width" in capsys.readouterr().err and not (tmp_path / "cnn").exists()


def test_default_epochs_follow_the_student(tmp_path):
    """The conv student costs about 100x the MLP a step: its default epochs keep the default run on
    Fashion-MNIST within 30 minutes on 2 cores (``CONV_STUDENT_EPOCHS``)."""
    from types import SimpleNamespace

    from gmcert.train.command import CONV_STUDENT_EPOCHS, _default_epochs

    np.savez(tmp_path / "big.npz", x=np.zeros((4, 1, 12, 12), np.float32), y=np.arange(4) % 2)
    args = SimpleNamespace(encoder=None, data=str(tmp_path / "big.npz"), data_root=None)
    assert _default_epochs(args, True) == CONV_STUDENT_EPOCHS < 30
    assert _default_epochs(SimpleNamespace(encoder=None, data="digits", data_root=None), True) == 100
    assert _default_epochs(args, False) == 30

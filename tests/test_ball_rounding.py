"""The certified pass's rounding over a whole ball (gmcert.bounds.ball_rounding): at points x'
within r of x, the float32 pass's error against the float64 one stays within A + B r, and its
output moves by at most rho_c + rho_r r; the bounds are close to what is observed where the
network is near-isometric, so an unsound slope fails here."""
import numpy as np
import pytest
import torch

from gmcert.encoders.cards import EncoderCard, load_encoder
from gmcert.bounds.ball_rounding import pass_with_ball
from gmcert.bounds.rounding import ForwardErrorBound

from test_rounding import _small_cnn


def _lipnet():
    torch.manual_seed(0)
    return load_encoder("gmcert_lipnet", pretrained=False)


def _lite0():
    card = EncoderCard(name="lite0_small", architecture="tf_efficientnet_lite0", input_size=(3, 16, 16),
                       mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic", feature_dim=1280)
    torch.manual_seed(0)
    return load_encoder(card, pretrained=False)


def _isometry():
    torch.manual_seed(0)
    layers = [torch.nn.Flatten()]
    for _ in range(3):
        layers.append(torch.nn.Linear(64, 64))
        torch.nn.init.orthogonal_(layers[-1].weight)
    return torch.nn.Sequential(*layers).eval()


def _lipconv():
    torch.manual_seed(0)
    return load_encoder("gmcert_lipconv", pretrained=False)  # BCOP convs, MaxMin, unshuffle, norm pooling


CASES = [("isometry", _isometry, (1, 8, 8)), ("lipconv", _lipconv, (1, 12, 12)), ("small_cnn", _small_cnn, (3, 20, 20)), ("lipnet", _lipnet, (1, 8, 8)), ("lite0", _lite0, (3, 12, 12))]


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
def test_ball_terms_hold_at_points_of_the_ball(name, make, shape):
    module = make()
    b32, b64 = ForwardErrorBound(module, shape, dtype=torch.float32), ForwardErrorBound(module, shape)
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(8, *shape, generator=gen, dtype=torch.float64)
    Z, err, A, B, rho_c, rho_r = pass_with_ball(b32, X, batch_size=3)
    Z_plain, err_plain = b32(X, batch_size=3)
    assert np.array_equal(Z, Z_plain) and np.allclose(err, err_plain, rtol=1e-12)  # the same pass
    assert np.all(A >= err) and B > 0 and np.all(rho_c >= 0) and rho_r >= b32.lipschitz
    used_error, used_move = 0.0, 0.0
    for r in (1e-4, 1e-2, 0.3, 2.0):
        for _ in range(4):
            d = torch.randn(X.shape, generator=gen, dtype=torch.float64)
            Xp = X + r * d / d.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))
            Zp, _ = b32(Xp)
            Zp64, err64 = b64(Xp)
            error, move = np.linalg.norm(Zp - Zp64, axis=1), np.linalg.norm(Zp - Z, axis=1)
            assert np.all(error <= A + B * r + err64), (name, r)
            assert np.all(move <= rho_c + rho_r * r), (name, r)
            used_error = max(used_error, float(np.max(error / (A + B * r))))
            used_move = max(used_move, float(np.max(move / (rho_c + rho_r * r))))
    assert used_error > 1e-6 or b32.lipschitz > 1e6  # not vacuous, where L is not (lite0 at random init)
    if name == "isometry":  # every layer orthogonal: the movement bound is nearly attained
        assert used_move > 0.5

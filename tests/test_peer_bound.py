"""What the peer benchmark (scripts/bench_lipschitz.py --data fashion-mnist) needs from gmcert's bounds,
on plain torch models (no orthogonium or deel-torchlip): the pair sorts' other layouts (orthogonium's
MaxMin, deel's GroupSort2) are 1-Lipschitz permutations; L2-norm pooling over windows
(``nn.LPPool2d``, p = 2) is bounded above every Jacobian's norm (the dense SVD), a bound of 1 for
overlapping windows would fail, and its rounding bound holds against float32; the certified radius
of a logit classifier, ``min_j (z_y - z_j) / (||w_y - w_j|| L_body)``, survives PGD and is tight on
a linear model."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from attacks import attack
from gmcert.bounds.lipschitz import LipschitzUnsupportedError, layer_bounds, spectral_bound
from gmcert.bounds.logit_margin import gap_radii, logit_radii
from gmcert.bounds.rounding import ForwardErrorBound
from gmcert.networks.small import GroupSort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maxmin_halves(x):  # orthogonium 0.0.4's MaxMin(axis=1), written out
    a, b = x.split(x.shape[1] // 2, 1)
    return torch.cat([torch.max(a, b), torch.min(a, b)], dim=1)


def _groupsort2(x):  # deel-torchlip 1.0.5's GroupSort2 (group_sort with group size 2), written out
    pairs = x.view(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])
    return torch.cat([pairs.min(2, keepdim=True)[0], pairs.max(2, keepdim=True)[0]], dim=2).view(x.shape)


@pytest.mark.parametrize("module, reference", [(GroupSort(halves=True), _maxmin_halves),
                                               (GroupSort(min_first=True), _groupsort2)])
@pytest.mark.parametrize("shape", [(6, 3, 4), (8,)])
def test_pair_sort_layouts_match_the_libraries_and_are_1_lipschitz(module, reference, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((64, *shape), generator=gen, dtype=torch.float64)
    assert torch.equal(module(x), reference(x))
    assert not torch.equal(module(x), GroupSort()(x))  # a layout of its own, not the default one
    assert layer_bounds(module, shape)[0][1] == 1.0
    d = torch.randn((64, *shape), generator=gen, dtype=torch.float64) * torch.logspace(-6, 0, 64).view(
        -1, *([1] * len(shape)))
    ratio = (module(x + d) - module(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 1.0 + 1e-8 and float(ratio.max()) > 0.9


def _largest_jacobian_norm(module, shape, points):
    """The largest spectral norm of the dense Jacobian (its SVD) over ``points`` inputs: a lower bound on L."""
    gen = torch.Generator().manual_seed(1)
    best = 0.0
    for i in range(points):
        x = torch.rand(shape, generator=gen, dtype=torch.float64) + (0.0 if i % 2 else 0.5)  # half near-constant
        x = x if i % 3 else torch.full(shape, 0.3, dtype=torch.float64) + 1e-3 * x  # the stretch of flat patches
        jac = jacobian(lambda t: module(t[None])[0], x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.svdvals(jac)[0]))
    return best


@pytest.mark.parametrize("kernel, stride, shape", [(2, None, (2, 6, 6)), (2, None, (1, 7, 5)), (3, 2, (1, 7, 7)),
                                                   ((2, 3), (2, 1), (2, 6, 6))])
def test_l2_norm_pool_bound_holds_against_the_dense_jacobian(kernel, stride, shape):
    pool = nn.LPPool2d(2, kernel, stride)
    ((_, bound),) = layer_bounds(pool, shape)
    largest = _largest_jacobian_norm(pool, shape, 12)
    assert largest <= bound * (1 + 1e-9), (largest, bound)
    k, s = nn.modules.utils._pair(kernel), nn.modules.utils._pair(stride or kernel)
    if k == s:  # disjoint windows: each row of the Jacobian is a unit vector on its own window
        assert bound == 1.0 and largest == pytest.approx(1.0, rel=1e-9)
    else:  # overlapping windows: a bound of 1 would be wrong, as flat patches show
        assert largest > 1.2 and bound == math.sqrt(math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1]))


def test_l2_norm_pool_variants_without_a_bound_are_refused():
    for pool in (nn.LPPool2d(1, 2), nn.LPPool2d(3, 2), nn.LPPool2d(2, 3, 2, ceil_mode=True)):
        with pytest.raises(LipschitzUnsupportedError, match="LPPool2d"):
            layer_bounds(pool, (1, 7, 7))


def _peer_like(seed=0):
    """deel's example in miniature, random (unconstrained) weights: conv, GroupSort2, L2 pool, conv,
    orthogonium's MaxMin, L2 pool, flatten, linear, MaxMin, linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), GroupSort(min_first=True), nn.LPPool2d(2, 2),
                         nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), GroupSort(halves=True),
                         nn.LPPool2d(2, 2), nn.Flatten(), nn.Linear(6 * 2 * 2, 8), GroupSort(halves=True),
                         nn.Linear(8, 5)).eval()


@pytest.mark.parametrize("kernel, stride", [(2, None), (3, 2)])
def test_float32_l2_pool_stays_within_its_own_rounding_term(kernel, stride):
    pool, shape = nn.LPPool2d(2, kernel, stride), (3, 8, 9)
    X = torch.rand(32, *shape, generator=torch.Generator().manual_seed(6)) * torch.logspace(-3, 3, 32).view(-1, 1, 1, 1)
    X[:4] *= 1e-22  # squares that underflow in float32
    (z64, e64), (z32, e32) = (ForwardErrorBound(pool, shape, dtype=d)(X) for d in (torch.float64, torch.float32))
    observed = np.abs(z32 - z64).max(1)  # the pool alone: its own term is the whole bound
    assert np.all(np.linalg.norm(z32 - z64, axis=1) <= e32 + e64)
    assert np.all(observed[4:] > 1e-3 * e32[4:] / math.sqrt(z32.shape[1]))  # measured: about 1/150 of it


def test_float32_pass_with_l2_pools_stays_within_its_rounding_bound():
    net, shape = _peer_like(), (1, 9, 8)
    X = torch.rand(16, *shape, generator=torch.Generator().manual_seed(2))
    X[:4] *= 1e-30  # squares that underflow in float32
    (z64, e64), (z32, e32) = (ForwardErrorBound(net, shape, dtype=d)(X) for d in (torch.float64, torch.float32))
    observed = np.linalg.norm(z32 - z64, axis=1)
    assert np.all(observed <= e32 + e64)
    assert observed[4:].max() > 1e-4 * e32[4:].max()  # not vacuous
    with torch.no_grad():
        assert np.abs(z64 - net.double()(X.double()).numpy()).max() < 1e-12


def test_pairwise_radius_survives_pgd_on_a_plain_nonlinear_model():
    net, shape = _peer_like(), (1, 9, 8)
    X = torch.rand(24, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cert = logit_radii(net, X, shape)
    with torch.no_grad():
        assert np.array_equal(cert.prediction, net.double()(X).argmax(1).numpy())
    assert cert.lipschitz == pytest.approx(spectral_bound(net, shape), rel=1e-12)
    assert cert.body_lipschitz * np.max(cert.pair_norms) <= math.sqrt(2) * cert.lipschitz * (1 + 1e-7)
    whole = logit_radii(net, X, shape, pairwise=False)
    assert np.all(cert.radius >= whole.radius) and np.any(cert.radius > whole.radius)
    assert float(cert.radius.min()) > 0
    pred = torch.as_tensor(cert.prediction)
    assert not attack(net.double(), X, pred, torch.as_tensor(cert.radius) * 0.999, steps=60, starts=3).any()


def test_pairwise_radius_is_the_exact_distance_to_a_linear_models_boundary():
    torch.manual_seed(4)
    net, shape = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval(), (1, 3, 4)
    X = torch.rand(32, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cert = logit_radii(net, X, shape)
    pred, radius = torch.as_tensor(cert.prediction), torch.as_tensor(cert.radius)
    assert cert.body_lipschitz == 1.0
    assert not attack(net.double(), X, pred, radius * 0.999, steps=60, starts=3).any()
    assert attack(net.double(), X, pred, radius * 1.01, steps=60, starts=3).all()  # tight: a bound, not slack


def test_gap_radii_subtract_the_rounding_bound_and_give_ties_zero():
    pair = np.array([[0.0, 2.0, 1.0], [2.0, 0.0, 0.5], [1.0, 0.5, 0.0]])
    scores = np.array([[3.0, 1.0, 2.5], [0.0, 2.0, 2.0], [1.0, 1.0, 4.0]])
    err = np.array([0.0, 0.0, 0.1])
    pred, radius = gap_radii(scores, err, pair, body_lipschitz=2.0)
    assert pred.tolist() == [0, 1, 2]
    assert radius[0] == pytest.approx(min(2.0 / 4.0, 0.5 / 2.0), rel=1e-8) and radius[0] < 0.25
    assert radius[1] == 0.0  # a tie: no radius
    assert radius[2] == pytest.approx(min((3 - math.sqrt(2) * 0.1) / 2.0, (3 - math.sqrt(2) * 0.1) / 1.0), rel=1e-8)
    _, radius = gap_radii(scores, np.array([0.0, 0.0, np.inf]), pair, 2.0)
    assert radius[2] == 0.0

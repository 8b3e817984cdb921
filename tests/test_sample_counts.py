"""``Certificate.samples`` is the exact number of base-classifier evaluations an input used, pilot
included, and ``max_samples`` is never exceeded: a wrapper around the model counts every forward
pass, in every certify mode."""
import numpy as np
import pytest
import torch

from gmcert.smoothing.smoother import HeadPrior, Smoother


class Counted(torch.nn.Module):
    """Scores of three classes from the noisy input's mean pixel: near 0.5 two classes tie (a hard
    input: the short pilot cannot tell them apart, so the extended pilot runs); far from it one
    class wins. Counts the rows it scores."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def forward(self, x):
        self.rows += len(x)
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([-(m - 0.5) * 40, (m - 0.5) * 40, torch.full_like(m, -5.0)], dim=1)


INPUTS = [torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 0.9), torch.full((1, 4, 4), 0.52)]


@pytest.fixture
def counted():
    base = Counted()
    return base, Smoother(base, num_classes=3, sigma=0.25, batch_size=200, seed=0)


def _check(base, certs, before, max_samples=None):
    assert sum(c.samples for c in certs) == base.rows - before
    if max_samples is not None:
        assert all(c.samples <= max_samples for c in certs), [c.samples for c in certs]


def test_fixed_n_counts_every_draw(counted):
    base, smoother = counted
    for x in INPUTS:
        before = base.rows
        _check(base, [smoother.certify(x, 50, 700, 0.001)], before)


@pytest.mark.parametrize("target", [None, 0.1], ids=["radius", "target"])
def test_sequential_counts_every_draw_pilots_included(counted, target):
    base, smoother = counted
    for x in INPUTS:
        before = base.rows
        cert = smoother.certify_sequential(x, alpha=0.001, target_radius=target, max_samples=2000,
                                           max_radius=None if target else 0.5, prior=HeadPrior())
        _check(base, [cert], before, 2000)


def test_the_extended_pilot_is_counted(counted):
    """The tie input takes the 4x pilot after the first one: both are evaluations."""
    base, smoother = counted
    before = base.rows
    cert = smoother.certify_sequential(INPUTS[0], alpha=0.001, max_samples=1000, max_radius=0.5)
    assert base.rows - before == cert.samples
    assert cert.samples <= 1000
    assert cert.samples >= 32 + 128  # it did run the extended pilot


def test_batch_and_triage_count_every_draw(counted):
    base, smoother = counted
    X = torch.stack(INPUTS)
    before = base.rows
    _check(base, smoother.certify_batch(X, max_samples=1500, max_radius=0.5), before, 1500)
    before = base.rows
    certs = smoother.certify_batch(X, target_radii=np.full(3, 0.1), budget=1500, max_samples=1000)
    _check(base, certs, before, 1000)
    assert base.rows - before <= 1500


class CountedDEQ(Counted):
    """The serialized-smoothing hooks of a DEQ (``serial_state`` ...) around the counted scores."""

    def __init__(self):
        super().__init__()
        self.serial_state, self.serial_steps, self.last_state, self.last_steps = None, 1, None, 1

    def forward(self, x):
        self.last_state = x.detach()
        return super().forward(x)


def test_serialized_counts_chain_cold_batches_and_audit():
    base = CountedDEQ()
    smoother = Smoother(base, num_classes=3, sigma=0.25, batch_size=100, seed=0)
    for x in INPUTS:
        before = base.rows
        cert = smoother.certify_serialized(x, 20, 900, 0.001, steps=2, warmup_interval=3, audit_size=200)
        assert cert.samples == base.rows - before
        assert int(cert.stop_reason.split("audit=")[1].split("/")[1].split(",")[0]) > 0  # the audit ran

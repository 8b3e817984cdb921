"""Verified serialized smoothing of a contractive DEQ: the contraction is real, the standard solve
meets its tolerance sample by sample, every verified warm answer is the standard DEQ's own answer
(near decision boundaries too, down to float precision), and the certificate is exactly Cohen's."""
import numpy as np
import pytest
import torch

from gmcert.bounds.contraction import certified_norms
from gmcert.networks.cdeq import dft_operator_norm
from gmcert.errors import DataError
from gmcert.inputs import load_inputs
from gmcert.smoothing.srs import _chain_summary, _verified_parts, certify_verified
from gmcert.smoothing.verified import STEM_RELATIVE, Contraction, verify
from trained_deqs import model_copy, train_digits_deq

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cdeq(tmp_path_factory):
    trained = train_digits_deq(tmp_path_factory, "gmcert_cdeq", epochs=8)
    base = trained["pipeline"].torch_module()
    return {**trained, "base": base, "parts": _verified_parts(base)}


def _normalised(encoder, x):
    return (encoder.resize(x) - encoder.mean) / encoder.std


def test_a_contractive_deq_trains_on_digits(cdeq):
    assert cdeq["record"]["network"]["clean_accuracy"] >= 0.95, cdeq["record"]["network"]
    assert cdeq["parts"][2].lipschitz <= 0.5 * (1 + 1e-6)
    assert cdeq["parts"][2].unit == 2.0 ** -24  # float32 on the CPU (TF32's unit on CUDA when allowed)


def test_verify_proves_nothing_where_its_own_bounds_do_not_hold(cdeq):
    """A cell with L >= 1, or iterates so large that the rounding cap fails, prove nothing; the same
    rows with sane figures are proven (so the refusals are not the check failing for another reason)."""
    _, _, contraction, geometry = cdeq["parts"]
    latent_mean = geometry.means[0]
    # features whose latent is the first class mean (projection rows are orthonormal): a clear winner
    features = np.linalg.lstsq(geometry.proj_weight, latent_mean, rcond=None)[0] + geometry.proj_mean
    args = dict(residual=np.full(3, 1e-4), previous_norm=np.full(3, 10.0), current_norm=np.full(3, 10.0),
                u_norm=np.full(3, 10.0), features=np.tile(features, (3, 1)), dim=1024)
    ok, cls, _ = verify(**args, contraction=contraction, head=geometry)
    assert ok.all() and (cls == 0).all()
    expanding = Contraction(norms=(1.0, 1.0), abs_norms=contraction.abs_norms, dot=contraction.dot,
                            tol=contraction.tol, window=contraction.window)
    assert not verify(**args, contraction=expanding, head=geometry)[0].any()
    huge = {**args, "current_norm": np.full(3, 1e12), "previous_norm": np.full(3, 1e12)}
    assert not verify(**huge, contraction=contraction, head=geometry)[0].any()


def test_the_certified_norms_bound_the_convolutions(cdeq):
    net = cdeq["pipeline"].encoder.network
    n1, n2, a1, a2 = certified_norms(net.cell)
    for w, bound, abs_bound in zip(net.cell.weights, (n1, n2), (a1, a2)):
        # power iteration on the actual zero-padded convolution (64 random starts) stays below the bound
        v = torch.randn(64, 16, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        w64 = w.detach().double()
        for _ in range(200):
            v = torch.nn.functional.conv_transpose2d(torch.nn.functional.conv2d(v, w64, padding=1), w64, padding=1)
            v = v / v.flatten(1).norm(dim=1)[:, None, None, None]
        estimate = float(torch.nn.functional.conv2d(v, w64, padding=1).flatten(1).norm(dim=1).max())
        assert estimate <= bound and bound <= estimate * 1.01, (estimate, bound)
        assert float(dft_operator_norm(w64, (8, 8))) == pytest.approx(bound, rel=1e-6)
        assert abs_bound >= bound


def test_the_cell_contracts_even_against_an_adversary(cdeq):
    net = cdeq["pipeline"].encoder.network
    L = cdeq["parts"][2].lipschitz
    g = torch.Generator().manual_seed(1)
    u = net.stem(_normalised(cdeq["pipeline"].encoder, torch.as_tensor(cdeq["x"][:32]))).detach().double()
    z = torch.randn(u.shape, generator=g, dtype=torch.float64).requires_grad_()
    dz = (1e-2 * torch.randn(u.shape, generator=g, dtype=torch.float64)).requires_grad_()
    w1, w2 = (w.detach().double() for w in net.cell.weights)
    cell = lambda z: torch.relu(torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(z, w1, padding=1)),  # noqa: E731
                                                          w2, padding=1) + u)
    optimiser = torch.optim.Adam([z, dz], lr=1e-2)
    for _ in range(150):  # gradient ascent on the expansion ratio
        ratio = (cell(z + dz) - cell(z)).flatten(1).norm(dim=1) / dz.flatten(1).norm(dim=1)
        optimiser.zero_grad()
        (-ratio.sum()).backward()
        optimiser.step()
    worst = float(ratio.detach().max())
    assert worst <= L, (worst, L)
    assert worst > 0.3 * L  # the adversary got somewhere: the check can fail


def test_the_standard_solve_meets_its_tolerance_whatever_the_batch(cdeq):
    net = cdeq["pipeline"].encoder.network.eval()
    enc = cdeq["pipeline"].encoder
    x = torch.as_tensor(cdeq["x"][:40]) + 0.25 * torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone = torch.cat([enc(x[i:i + 1]) for i in range(8)])
        together = enc(x)[:8]
        u = net.stem(_normalised(enc, x))
        z = net.last_state
        residual = (net.cell(z, u) - z).flatten(1).norm(dim=1)
    assert float(residual.max()) <= net.tol
    assert torch.allclose(alone, together, rtol=1e-5, atol=1e-5)
    # the stem's batch-to-batch rounding is far inside what verification assumes
    with torch.no_grad():
        stems = [net.stem(_normalised(enc, x[:k]))[:8] for k in (8, 17, 40)]
    gap = max(float(((s - stems[0]).flatten(1).norm(dim=1) / stems[0].flatten(1).norm(dim=1)).max()) for s in stems)
    assert gap <= STEM_RELATIVE / 10


def test_the_float32_cell_errs_within_its_rounding_bound(cdeq):
    """verify's e_F (the dot-product bound) holds for the convolution kernels this torch picks."""
    net = cdeq["pipeline"].encoder.network
    contraction = cdeq["parts"][2]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for size in (1, 7, 250, 1000):
            x = torch.as_tensor(cdeq["x"][:size]) if size <= len(cdeq["x"]) else torch.rand(size, 1, 8, 8, generator=g)
            u = net.stem(_normalised(cdeq["pipeline"].encoder, x))
            z = 3 * torch.rand(u.shape, generator=g)
            net.cell.prepare()
            w1, w2 = (w.double() for w in net.cell.weights)
            exact = torch.relu(torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(z.double(), w1, padding=1)),
                                                          w2, padding=1) + u.double())
            error = (net.cell(z, u).double() - exact).flatten(1).norm(dim=1)
            bound = contraction.cell_error(z.double().flatten(1).norm(dim=1).numpy(), u.double().flatten(1).norm(dim=1).numpy())
            assert np.all(error.numpy() <= bound), (size, float((error.numpy() / bound).max()))
            assert float((error.numpy() / bound).max()) > 1e-4  # worst case over typical: not absurdly loose


def _boundary_inputs(cdeq, pairs=6, offsets=(1e-2, 1e-4, 1e-6, 0.0)):
    """Images on both sides of the standard DEQ's decision boundary, at ``offsets`` from it along a
    segment between two differently classified test images (bisection to float precision)."""
    base = cdeq["base"]
    x, out = torch.as_tensor(cdeq["x"]), []
    with torch.no_grad():
        labels = base(x[:60]).argmax(1)
        found = 0
        for i in range(60):
            j = int(torch.nonzero(labels != labels[i])[found % 7])
            a, b = x[i], x[j]
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                same = int(base(((1 - mid) * a + mid * b)[None]).argmax()) == int(labels[i])
                lo, hi = (mid, hi) if same else (lo, mid)
            out += [(1 - t) * a + t * b for o in offsets for t in (lo - o, hi + o)]
            found += 1
            if found == pairs:
                break
    return torch.stack(out)


@pytest.fixture(scope="module")
def two_components(cdeq):
    """The same encoder under a head with two full-covariance components per class."""
    import copy

    from gmcert.latent.mixture import GaussianMixtureClassifier

    pipeline = copy.copy(cdeq["pipeline"])
    inputs = load_inputs({"data": "digits"}, channels=1)
    train = np.setdiff1d(np.arange(len(inputs.labels)), np.asarray(pipeline.metadata["test_index"]))
    pipeline.head = GaussianMixtureClassifier(covariance_type="full", shrinkage="ledoit_wolf",
                                              n_components_per_class=2, random_state=0).fit(
        pipeline.latents(inputs.x[train]), inputs.labels[train])
    base = pipeline.torch_module()
    return {**cdeq, "pipeline": pipeline, "base": base, "parts": _verified_parts(base)}


@pytest.mark.parametrize("head", ["one component per class", "two components per class"])
def test_every_verified_answer_is_the_standard_answer_near_boundaries(cdeq, two_components, head):
    cdeq = cdeq if head.startswith("one") else two_components
    encoder, deq, contraction, geometry = cdeq["parts"]
    assert geometry.single_component == head.startswith("one")
    base = cdeq["base"]
    near = _boundary_inputs(cdeq)
    g = torch.Generator().manual_seed(3)
    noisy = torch.cat([near, near + 0.25 * torch.randn(near.shape, generator=g),
                       torch.as_tensor(cdeq["x"][:100]) + 0.25 * torch.randn(100, 1, 8, 8, generator=g)])
    proven = wrong = 0
    with torch.no_grad():
        standard = torch.cat([base(noisy[i:i + 7]).argmax(1) for i in range(0, len(noisy), 7)])  # other batches
        u = deq.stem(_normalised(encoder, noisy))
        starts = {"neighbour": torch.roll(deq.forward_features(_normalised(encoder, noisy)), 1, 0),
                  "zero": torch.zeros_like(u)}
        deq.cell.prepare()
        for start in starts.values():
            z = start
            for _ in range(8):
                previous, z = z, deq.cell(z, u)
                ok, cls, _ = verify(*_chain_summary(deq, previous, z, u), contraction, geometry)
                proven += int(ok.sum())
                wrong += int((torch.as_tensor(cls[ok]) != standard[torch.as_tensor(ok)]).sum())
    assert wrong == 0
    assert proven > len(noisy)  # most rows are proven at some step: the check is not vacuous


def test_an_understated_contraction_is_caught_by_the_same_check(cdeq):
    """The check above can fail: claiming L = 0.001 'proves' answers the standard DEQ does not give."""
    encoder, deq, contraction, geometry = cdeq["parts"]
    fake = Contraction(norms=(0.03, 0.03), abs_norms=contraction.abs_norms, dot=contraction.dot, tol=contraction.tol,
                       window=contraction.window)
    near = _boundary_inputs(cdeq, pairs=6, offsets=(1e-2, 1e-3))
    with torch.no_grad():
        standard = cdeq["base"](near).argmax(1)
        u = deq.stem(_normalised(encoder, near))
        deq.cell.prepare()
        previous = deq.cell(torch.zeros_like(u), u)  # two steps from a cold start: far from the fixed point
        z = deq.cell(previous, u)
        ok, cls, _ = verify(*_chain_summary(deq, previous, z, u), fake, geometry)
        honest, _, _ = verify(*_chain_summary(deq, previous, z, u), contraction, geometry)
    assert int((torch.as_tensor(cls[ok]) != standard[torch.as_tensor(ok)]).sum()) > 0
    assert not honest.any()


def test_verified_srs_is_cohens_certificate_at_a_fraction_of_the_cost(cdeq):
    pipeline, base = cdeq["pipeline"], cdeq["base"]
    calls = [0]
    base.register_forward_hook(lambda module, inputs, output: calls.__setitem__(0, calls[0] + len(inputs[0])))
    from gmcert.smoothing.smoother import Smoother

    smoother = Smoother(base, num_classes=len(pipeline.head.classes_), sigma=0.25, batch_size=250, seed=0)
    n0, n = 50, 2000
    for i in range(4):
        image = torch.as_tensor(cdeq["x"][i])
        smoother.reseed(i)
        standard = smoother.certify(image, n0, n, 0.001)
        smoother.reseed(i)
        calls[0] = 0
        cert = certify_verified(smoother, image, n0, n, 0.001, steps=6)
        assert (cert.prediction, cert.radius, cert.extra["n_a"]) == (standard.prediction, standard.radius,
                                                                     standard.extra["n_a"])
        extra = cert.extra
        assert extra["verified"] + extra["fallback"] + extra["cold"] == n and extra["verified"] > n / 2
        assert calls[0] == n0 + extra["fallback"] and cert.samples == n0 + n + extra["fallback"]
        cold_steps = pipeline.encoder.network.last_steps
        assert 0 < extra["solver_steps"] < (n0 + n) * cold_steps
        assert cert.stop_reason.startswith("verified:")


def test_verified_srs_needs_a_contractive_deq():
    from gmcert.smoothing.smoother import Smoother

    smoother = Smoother(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), num_classes=3, sigma=0.25)
    with pytest.raises(DataError, match="contractive DEQ"):
        certify_verified(smoother, torch.rand(1, 8, 8), 10, 100, 0.01)


def _model_dir(cdeq, tmp_path):
    return model_copy(cdeq, tmp_path, "cdeq")


def test_certify_verify_writes_cohens_rows_and_resumes(cdeq, tmp_path, interrupt_smoothing):
    from gmcert.cli import main
    from gmcert.report import read_tsv

    model = _model_dir(cdeq, tmp_path)
    common = ["certify", "--model", str(model), "--method", "smoothing", "--n-samples", "1500", "--n0", "20",
              "--limit", "3", "--cache-dir", ""]
    assert main([*common, "--out", str(tmp_path / "cohen.tsv")]) == 0
    args = [*common, "--serialized", "--verify"]
    assert main([*args, "--out", str(tmp_path / "srs.tsv")]) == 0
    cohen, srs = read_tsv(tmp_path / "cohen.tsv"), read_tsv(tmp_path / "srs.tsv")
    same = ("idx", "label", "predict", "radius", "correct", "radius_kind")
    assert [{k: r[k] for k in same} for r in srs] == [{k: r[k] for k in same} for r in cohen]
    for r in srs:
        fields = dict(f.split("=") for f in r["stop_reason"].split(":")[1].split(","))
        assert int(fields["verified"].split("/")[0]) > 750 and r["samples"] == 1520 + int(fields["fallback"])
    arm, disarm = interrupt_smoothing
    arm(1)
    assert main([*args, "--out", str(tmp_path / "cut.tsv")]) == 130
    disarm()
    assert main([*args, "--out", str(tmp_path / "cut.tsv")]) == 0
    drop = ("time", "latent_radius")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_tsv(tmp_path / "cut.tsv")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in srs]


@pytest.mark.parametrize("extra, message", [
    (["--method", "smoothing", "--verify"], "use it with --serialized"),
    (["--method", "smoothing", "--serialized", "--verify", "--audit-size", "10"], "takes no --audit-size"),
])
def test_certify_verify_refuses_bad_use(cdeq, tmp_path, capsys, extra, message):
    from gmcert.cli import main

    model = _model_dir(cdeq, tmp_path)
    assert main(["certify", "--model", str(model), "--limit", "2", "--cache-dir", "", "--out",
                 str(tmp_path / "c.tsv"), *extra]) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.glob("c.*"))


def test_compare_puts_verified_srs_beside_cohen(cdeq, tmp_path):
    import json

    from gmcert.cli import main
    from gmcert.report import read_tsv

    model = _model_dir(cdeq, tmp_path)
    assert main(["compare", "--model", str(model), "--methods", "cohen,srs-verified", "--cohen-n", "600", "--srs", "6",
                 "--n-inputs", "2", "--cache-dir", ""]) == 0
    summary = json.loads((model / "compare" / "summary.json").read_text())
    assert set(summary["methods"]) == {"cohen-n600", "srsv6-n600"}
    cohen, srs = (read_tsv(model / "compare" / f"{m}.tsv") for m in ("cohen-n600", "srsv6-n600"))
    assert [r["radius"] for r in srs] == [r["radius"] for r in cohen]
    assert all(r["stop_reason"].startswith("verified:solver_steps=") for r in srs)


def test_verified_srs_refuses_a_stem_that_changes_with_the_batch_layout(cdeq, monkeypatch):
    """STEM_RELATIVE is a checked premise: a stem whose output depends on the batch size (as a
    layout-dependent kernel's may) gets the run refused, not a proof that rests on it."""
    from gmcert.smoothing.smoother import Smoother

    class LayoutDependent(torch.nn.Module):
        def __init__(self, stem):
            super().__init__()
            self.inner = stem

        def forward(self, v):
            return self.inner(v) * (1 + 1e-3 * (len(v) > 40))  # large batches differ

    deq = cdeq["parts"][1]
    monkeypatch.setattr(deq, "stem", LayoutDependent(deq.stem))
    smoother = Smoother(cdeq["base"], num_classes=len(cdeq["pipeline"].head.classes_), sigma=0.25, batch_size=64)
    with pytest.raises(DataError, match="batch layout"):
        certify_verified(smoother, torch.as_tensor(cdeq["x"][0]), 10, 200, 0.01)


def test_the_standard_deq_is_one_function_of_each_sample(cdeq):
    """In eval mode the DEQ runs in layout-free arithmetic: a sample's fixed point is bitwise the
    same alone, in a batch of 64 and in uneven splits, and the global flags are restored."""
    deq, x = cdeq["parts"][1], torch.as_tensor(cdeq["x"][:64])
    was = torch.are_deterministic_algorithms_enabled()
    with torch.no_grad():
        full = deq.forward_features(x)
        alone = torch.cat([deq.forward_features(x[i:i + 1]) for i in range(len(x))])
        split = torch.cat([deq.forward_features(x[:37]), deq.forward_features(x[37:])])
    assert torch.equal(full, alone) and torch.equal(full, split)
    assert torch.are_deterministic_algorithms_enabled() == was and torch.backends.mkldnn.enabled


def test_a_deq_on_cuda_needs_deterministic_cublas(monkeypatch):
    from gmcert.networks.arithmetic import layout_free_arithmetic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(DataError, match="CUBLAS_WORKSPACE_CONFIG"):
        with layout_free_arithmetic("cuda"):
            pass
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with layout_free_arithmetic("cpu"):
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.mkldnn.enabled

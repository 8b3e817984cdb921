"""The peer Lipschitz libraries of ``scripts/bench_lipschitz.py --data fashion-mnist``, trained on the
same rows with the same time budget, then exported to plain torch layers and bounded by gmcert.

* ``orthogonium`` 0.0.4: its ``StagedCNN`` factory (AOC convs, ``AdaptiveOrthoConv2d`` 3x3 with its
  default circular padding; a strided AOC conv between the two stages; MaxMin; ``OrthoLinear``),
  16 and 32 channels x 2, one 64-wide dense layer, trained with its ``LossXent`` (offset 2.12132,
  temperature 0.25). Its claim: ``margin / sqrt(2)`` (``orthogonium.losses.VRA``, last layer
  ``global``, L = 1).
* ``deel-torchlip`` 1.0.5: the network of its "HKR multiclass and fooling" Fashion-MNIST example
  (spectral convs 16 and 32, GroupSort2, scaled L2-norm pooling, spectral linear 1568 -> 64 -> 10)
  with ``HKRMulticlassLoss(alpha = 100 / 101, min_margin = 0.25)`` (the example's alpha = 100 in
  the library's current [0, 1] form). Its claim: ``(top1 - top2) / sqrt(2)``.

Both train by Adam (lr 1e-3, batch 128, cosine decay over the budget: the schedule gmcert's
``--time-budget`` follows), until the budget's wall seconds of training steps are spent.

Export: every conv becomes a plain ``nn.Conv2d`` (same stride, padding, padding mode, groups)
holding the weight the library's forward applies, every linear layer a plain ``nn.Linear``, the
pair sorts gmcert's :class:`gmcert.networks.small.GroupSort` with the library's pairing and order;
anything else is refused. The export must reproduce the library's scores on the certified inputs.
The certificate is then :func:`gmcert.bounds.logit_margin.logit_radii` of the export: gmcert's own
bound on those weights, never the library's L = 1.

Install the libraries with ``pip install -e '.[bench]'``; they are imported only here, lazily.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gmcert.bounds.lipschitz import layer_bounds
from gmcert.bounds.logit_margin import logit_radii
from gmcert.networks.small import GroupSort

PEERS = ("orthogonium", "deel-torchlip")
MODULES = {"orthogonium": "orthogonium", "deel-torchlip": "deel.torchlip"}
SHAPE = (1, 28, 28)


def missing() -> list:
    """The peer libraries that are not installed."""
    def found(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package (deel) is absent
            return False
    return [peer for peer in PEERS if not found(MODULES[peer])]


def build(peer: str, seed: int):
    """``(model, loss(scores, labels))`` of a peer, initialised from ``seed``."""
    torch.manual_seed(seed)
    if peer == "orthogonium":
        from orthogonium.layers import AdaptiveOrthoConv2d
        from orthogonium.losses import LossXent
        from orthogonium.model_factory.classparam import ClassParam
        from orthogonium.model_factory.models_factory import StagedCNN

        # padding 1 rather than the factory's "same", which torch refuses for the strided conv
        conv = ClassParam(AdaptiveOrthoConv2d, kernel_size=3, bias=True, padding=1)
        model = StagedCNN(img_shape=(1, 28, 28), dim_repeats=[(16, 2), (32, 2)], dim_nb_dense=(64, 1),
                          n_classes=10, conv=conv, norm=None)
        return model, LossXent(n_classes=10, offset=2.12132, temperature=0.25)
    from deel import torchlip

    model = torchlip.Sequential(
        torchlip.SpectralConv2d(in_channels=1, out_channels=16, kernel_size=(3, 3), padding="same"),
        torchlip.GroupSort2(), torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
        torchlip.SpectralConv2d(in_channels=16, out_channels=32, kernel_size=(3, 3), padding="same"),
        torchlip.GroupSort2(), torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
        nn.Flatten(), torchlip.SpectralLinear(1568, 64), torchlip.GroupSort2(),
        torchlip.SpectralLinear(64, 10, bias=False), k_coef_lip=1.0)
    hkr = torchlip.HKRMulticlassLoss(alpha=100 / 101, min_margin=0.25)
    return model, lambda scores, y: hkr(scores, nn.functional.one_hot(y, 10))


def train(model, loss_fn, images, labels, budget, seed, lr=1e-3, batch_size=128) -> dict:
    """Adam with a cosine over the budget; returns wall and CPU seconds of the training steps, the steps,
    and the epochs they make (a fraction: the budget ends one part way)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    wall = cpu = 0.0
    steps = epochs = 0
    model.train()
    while wall < budget:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 7919 + epochs))
        for begin in range(0, len(images) - 1, batch_size):
            if wall >= budget:
                break
            start, start_cpu = time.perf_counter(), time.process_time()
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * min(1.0, wall / budget)))
            index = order[begin:begin + batch_size]
            loss = loss_fn(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            steps += 1
        epochs += 1
    model.eval()
    return {"seconds": wall, "cpu_seconds": cpu, "steps": steps, "batch_size": batch_size, "lr": lr,
            "epochs": steps * batch_size / len(images)}


def _plain(module):
    """One library layer as plain torch (or gmcert) layers, holding the weights its forward applies."""
    if isinstance(module, nn.Conv2d):
        plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                          module.dilation, module.groups, module.bias is not None, module.padding_mode)
    elif isinstance(module, nn.Linear):
        plain = nn.Linear(module.in_features, module.out_features, module.bias is not None)
    elif type(module) in (nn.Flatten, nn.LPPool2d, GroupSort):
        return [module]
    elif type(module) is nn.Identity:
        return []
    elif type(module).__name__ == "MaxMin" and type(module).__module__.startswith("orthogonium"):
        if module.axis != 1:
            raise TypeError(f"MaxMin over axis {module.axis}: only channels (axis 1) are exported")
        return [GroupSort(halves=True)]
    elif type(module).__name__ == "GroupSort2" and type(module).__module__.startswith("deel"):
        if module._coefficient_lip != 1.0:
            raise TypeError(f"GroupSort2 scaled by {module._coefficient_lip}: no plain counterpart")
        return [GroupSort(min_first=True)]
    else:
        raise TypeError(f"no plain export for {type(module).__module__}.{type(module).__name__}")
    with torch.no_grad():
        plain.weight.copy_(module.weight.detach())  # materialised: the library's parametrisation as evaluated
        if module.bias is not None:
            plain.bias.copy_(module.bias.detach())
    return [plain]


def export(peer: str, model) -> nn.Sequential:
    """The trained peer as an ``nn.Sequential`` of plain layers (module docstring)."""
    model.eval()
    layers = model.vanilla_export() if peer == "deel-torchlip" else model
    return nn.Sequential(*[p for m in layers for p in _plain(m)]).eval()


def trained_peer(peer, out: Path, images, labels, budget, seed):
    """``(library model, record)``: trained once into ``out/<peer>/`` (its state dict, safetensors), then reloaded."""
    from safetensors.torch import load_file, save_file

    folder = out / peer
    model, loss_fn = build(peer, seed)
    if (folder / "train.json").is_file():
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval(), json.loads((folder / "train.json").read_text())
    record = {"budget": budget, "seed": seed, "train_rows": len(images),
              **train(model, loss_fn, images, labels, budget, seed)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return model, record


def claimed_radii(model, x) -> tuple:
    """``(prediction, radius)`` the libraries themselves report: top-2 margin / sqrt(2), L taken as 1."""
    with torch.no_grad():
        scores = model(torch.as_tensor(x, dtype=torch.float32)).double()
    top = scores.topk(2, dim=1).values
    return scores.argmax(1).numpy(), ((top[:, 0] - top[:, 1]) / math.sqrt(2.0)).numpy()


def result(peer, out: Path, train_x, train_y, x, y, budget, seed) -> dict:
    """A peer trained for the budget (once, into ``out/<peer>/``), its radii recomputed by gmcert's bound
    from the exported weights, and the library's own claim (L = 1) beside them: a benchmark row."""
    model, record = trained_peer(peer, out, torch.as_tensor(train_x), torch.as_tensor(train_y, dtype=torch.long),
                                 budget, seed)
    exported = export(peer, model)
    with torch.no_grad():
        xt = torch.as_tensor(x)
        export_gap = float((exported(xt) - model(xt)).abs().max())
    start = time.perf_counter()
    cert = logit_radii(exported, x, SHAPE)
    seconds = (time.perf_counter() - start) / len(x)
    claim_pred, claim_radius = claimed_radii(model, x)
    both = (claim_pred == cert.prediction) & (cert.radius > 0)
    ratio = claim_radius[both] / cert.radius[both]  # > 1: the library claims more than gmcert certifies
    return {"rows": rows_from(cert.prediction, cert.radius, y), "passes": 1, "seconds": seconds, "kind": "bound",
            "train_seconds": record["seconds"], "cpu_seconds": record["cpu_seconds"], "steps": record["steps"],
            "epochs": record["steps"] * record.get("batch_size", 128) / record["train_rows"],
            "L": cert.lipschitz, "body_L": cert.body_lipschitz,
            "max_pair_norm": float(np.max(cert.pair_norms)) if cert.pair_norms is not None else None,
            "layers": layer_bounds(exported, SHAPE), "export_gap": export_gap,
            "claim_rows": rows_from(claim_pred, claim_radius, y),
            "claim_ratio": [float(f(ratio)) for f in (np.min, np.median, np.max)] if both.any() else None,
            "module": copy.deepcopy(exported).double().eval(), "index": lambda labels: np.asarray(labels)}


def rows_from(prediction, radius, labels) -> list:
    return [{"label": int(t), "predict": int(p), "radius": float(r), "correct": int(p == t)}
            for p, r, t in zip(prediction, radius, labels)]


def pgd_flips(module, x, prediction, radius, steps=40, starts=2, seed=0) -> np.ndarray:
    """Whether projected gradient ascent on the runner-up's score margin, from random starts inside
    the L2 ball of ``radius`` around each input (no box: the certificates hold on all of R^n), finds
    a point where ``module``'s argmax differs from ``prediction``. float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    index = torch.as_tensor(np.asarray(prediction), dtype=torch.long)
    r = torch.as_tensor(np.asarray(radius), dtype=torch.float64).view(-1, *([1] * (x.ndim - 1)))
    flipped = torch.zeros(len(x), dtype=torch.bool)

    def norm(t):
        return t.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(r)

    for _ in range(starts):
        delta = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        delta = delta / norm(delta) * r * 0.5
        for _ in range(steps):
            delta.requires_grad_(True)
            scores = module(x + delta)
            own = scores.gather(1, index[:, None])[:, 0]
            other = scores.masked_fill(nn.functional.one_hot(index, scores.shape[1]).bool(), -torch.inf).max(1).values
            (grad,) = torch.autograd.grad((own - other).sum(), delta)
            with torch.no_grad():
                flipped |= own < other
                delta = delta - 0.1 * r * grad / norm(grad)
                delta = delta * torch.clamp(r / norm(delta), max=1.0)
        with torch.no_grad():
            flipped |= module(x + delta).argmax(1) != index
    return flipped.numpy()

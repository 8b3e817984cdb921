"""The training loop: seeded epochs, one atomic checkpoint per epoch, exact resume.

Every epoch draws its batch order and its noise from generators seeded by (seed, epoch), and the
learning rate is a function of the epoch (cosine decay), so an epoch's work depends only on the
weights and optimizer state it starts from. A checkpoint holds exactly those, so a run killed at
any moment and rerun ends with the weights an uninterrupted run gives (on CPU, where kernels are
deterministic).

Under torchrun the student is wrapped in DistributedDataParallel: every rank draws the same batch
order, takes its rank's slice of each global batch (so the global batch size stays ``batch_size``)
and its own noise stream; DDP averages the gradients; rank 0 writes the checkpoint and every rank
resumes from it.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from gmcert.errors import DataError
from gmcert.train.losses import (METHODS, add_noise, consistency_loss, crt_loss, distillation_loss, gaussian_loss,
                                 margin_loss, shaping_penalty)

STUDENTS = ("standard", "lipschitz")
#: held-out rows the per-epoch curve is measured on (see :func:`train_network`)
MONITOR = 2000


@dataclass
class TrainConfig:
    """What ``gmcert train`` does; every field is part of the checkpoint's identity.

    ``copies``, ``consistency_weight`` and ``entropy_weight`` are Jeong and Shin's m, lambda and eta;
    ``crt_weight`` is CRT's w; ``head_copies`` noisy copies per training image feed the final
    Gaussian-mixture head. ``student="lipschitz"`` keeps the network's linear layers orthogonal
    while training (``margin`` is then the method: ``margin`` is the target latent radius, and
    ``distill_weight`` weighs distillation to a teacher's latents when one is given).
    """

    method: str = "gaussian"
    sigma: float = 0.25
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    copies: int = 2
    consistency_weight: float = 10.0
    entropy_weight: float = 0.5
    crt_weight: float = 1.0
    shape_latents: bool = False
    shape_weight: float = 1.0
    head_copies: int = 4
    seed: int = 0
    amp: bool = False
    student: str = "standard"
    margin: float = 0.75
    distill_weight: float = 1.0
    max_steps: int | None = None
    time_budget: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise DataError(f"unknown training method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise DataError(f"sigma must be a positive number (the noise to train and certify with), got {self.sigma}")
        for name in ("epochs", "batch_size", "copies", "head_copies"):
            if int(getattr(self, name)) < 1:
                raise DataError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.method == "consistency" and self.copies < 2:
            raise DataError("consistency training needs copies >= 2 (noisy copies per input)")
        for name in ("lr", "weight_decay", "consistency_weight", "entropy_weight", "shape_weight"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
                raise DataError(f"{name} must be a finite number >= 0 (lr > 0), got {value}")
        if self.student not in STUDENTS:
            raise DataError(f"unknown student {self.student!r}: choose one of {', '.join(STUDENTS)}")
        if (self.student == "lipschitz") != (self.method == "margin"):
            raise DataError("a Lipschitz student trains by the margin method, and only it does "
                            f"(student {self.student!r}, method {self.method!r})")
        if not (math.isfinite(self.margin) and self.margin > 0 and math.isfinite(self.distill_weight)
                and self.distill_weight >= 0):
            raise DataError(f"margin must be > 0 and distill_weight >= 0, got {self.margin}, {self.distill_weight}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise DataError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget > 0):
            raise DataError(f"time_budget must be a positive number of seconds, got {self.time_budget}")
        if not 0 <= self.crt_weight <= 1:
            raise DataError(f"crt_weight must be in [0, 1], got {self.crt_weight}")

    def as_dict(self) -> dict:
        return asdict(self)


def features_and_logits(student, x):
    """The student's pooled latents and logits (timm's ``forward_features`` / ``forward_head``)."""
    net = student.network
    h = net.forward_head(net.forward_features((student.resize(x) - student.mean) / student.std), pre_logits=True)
    return h, net.get_classifier()(h)


class _Forward(torch.nn.Module):
    """The student's (latents, logits) as one module call, which DistributedDataParallel wraps."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, x):
        return features_and_logits(self.student, x)


def _forward(student, config):
    """(callable x -> (latents, logits), world): DDP-wrapped under torchrun, the student itself otherwise."""
    from gmcert.distributed import current

    w = current()
    if not w.active:
        return (lambda x: features_and_logits(student, x)), w
    from torch.nn.parallel import DistributedDataParallel

    device = next(student.parameters()).device
    # margin's centers and distillation map are used outside the network's own layers
    return DistributedDataParallel(_Forward(student), device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=config.method == "margin"), w


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def run_fraction(config: TrainConfig, epoch: int, steps: int = 0, seconds: float = 0.0) -> float:
    """How far along the run is: the largest of the epochs', steps' and seconds' shares of their limits."""
    shares = [epoch / config.epochs]
    if config.max_steps is not None:
        shares.append(steps / config.max_steps)
    if config.time_budget is not None:
        shares.append(seconds / config.time_budget)
    return max(shares)


def epoch_lr(config: TrainConfig, epoch: int, steps: int = 0, seconds: float = 0.0) -> float:
    """Cosine decay from ``lr`` to 0 over the run (:func:`run_fraction`)."""
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, run_fraction(config, epoch, steps, seconds))))


def finished(config: TrainConfig, record: dict) -> bool:
    """Whether the run is over: its epochs done, or its steps or time budget spent."""
    return run_fraction(config, record["epochs_done"], record.get("steps", 0), record["compute"]["seconds"]) >= 1


def _batch_loss(student, forward, teacher, x, y, config, generator, counts):
    """The method's loss on one batch, and the student/teacher sample passes it costs (``forward``:
    x -> (latents, logits), through DDP under torchrun)."""
    if config.method == "margin":  # no noise: the radius itself is trained
        h, _ = forward(x)
        loss = margin_loss(h, y, student.centers, config.margin)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            counts["teacher_forward"] += len(x)
            loss = loss + config.distill_weight * distillation_loss(h, target, student.distill_map)
        counts["student_forward_backward"] += len(x)
        return loss + (config.shape_weight * shaping_penalty(h.float(), y) if config.shape_latents else 0.0)
    if config.method == "consistency":
        noisy = torch.cat([add_noise(x, config.sigma, generator) for _ in range(config.copies)])
        h, logits = forward(noisy)
        loss = consistency_loss(logits.view(config.copies, len(x), -1), y, config.consistency_weight,
                                config.entropy_weight)
        labels = y.repeat(config.copies)
    else:
        noisy = add_noise(x, config.sigma, generator)
        h, logits = forward(noisy)
        labels = y
        if config.method == "gaussian":
            loss = gaussian_loss(logits, y)
        else:
            with torch.no_grad():
                target = teacher(noisy)
            counts["teacher_forward"] += len(noisy)
            loss = crt_loss(logits, target, y, config.crt_weight)
    counts["student_forward_backward"] += len(noisy)
    if config.shape_latents:
        loss = loss + config.shape_weight * shaping_penalty(h.float(), labels)
    return loss


def _out_of_time(config, seconds_before, start, w, device) -> bool:
    """Whether the time budget is spent; under torchrun rank 0's clock decides for every rank (so that
    all take the same number of steps, as DDP's all-reduce needs)."""
    spent = seconds_before + time.perf_counter() - start >= config.time_budget
    if not w.active:
        return spent
    import torch.distributed as dist

    flag = torch.tensor([float(spent)], device=device if device.type == "cuda" else "cpu")
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _reduce(total, counts, device, w):
    import torch.distributed as dist

    values = torch.tensor([total, *counts.values()], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(values)
    return float(values[0]) / w.size, {k: int(v) for k, v in zip(counts, values[1:].tolist())}


def predict(student, x):
    """Class indices: the logits' argmax, or the nearest class centre for a margin-trained student."""
    if hasattr(student, "centers"):
        return torch.cdist(features_and_logits(student, x)[0], student.centers).argmin(1)
    return student(x).argmax(1)


def evaluate(student, images, labels, sigma: float, seed: int, batch_size: int = 1024) -> tuple[float, float]:
    """(clean accuracy, accuracy under one draw of N(0, sigma^2) noise) of the student (:func:`predict`).

    Each batch's clean and noisy copies go through the network as one call, and the counts stay on
    the device until the end (one host sync, not two per batch)."""
    if len(images) == 0:
        return float("nan"), float("nan")
    device = next(student.parameters()).device
    generator = _generator(device, seed)
    counts = torch.zeros(2, dtype=torch.long, device=device)
    student.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            both = predict(student, torch.cat([x, add_noise(x, sigma, generator)])) == y.repeat(2)
            counts += both.view(2, -1).sum(1)
    clean, noisy = counts.tolist()
    return clean / len(images), noisy / len(images)


def train_network(student, images, labels, config: TrainConfig, teacher=None, checkpoint=None, held_out=None,
                  identity: dict | None = None, progress: bool = True, stop_after: int | None = None,
                  monitor: int | None = MONITOR) -> dict:
    """Train ``student`` in place; returns the record (history per epoch and compute counts).

    Parameters
    ----------
    student : gmcert.encoders.cards.Encoder
        Pixels -> logits over ``K`` classes, on the device to train on.
    images, labels : torch.Tensor
        ``(N, C, H, W)`` pixels in [0, 1] and ``(N,)`` class indices 0..K-1.
    teacher : torch.nn.Module, optional
        Frozen, for ``crt`` (see :func:`gmcert.train.teacher.load_teacher`).
    checkpoint : path, optional
        Written atomically after every epoch; resumed from when it exists and belongs to this run.
    held_out : (images, labels), optional
        Clean and noisy accuracy per epoch are measured on ``monitor`` evenly spaced rows of it (and plotted);
        never trained on.
    identity : dict, optional
        What else the checkpoint must match (data, encoder) to be resumed.
    stop_after : int, optional
        Stop after this many epochs of this call (tests simulate a kill with it).
    monitor : int or None
        How many held-out rows the per-epoch curve is measured on (None: all). The curve only
        watches the run, and a full pass over a 15,000-image validation split each epoch cost a
        third of a LeNet epoch (``scripts/bench_throughput.py``); 2,000 rows give each point a
        standard error of at most 1.1 points. The final figures (``gmcert.train.workflow``) use
        every held-out row.
    """
    from gmcert.train.checkpoint import load_checkpoint

    if config.method == "crt" and teacher is None:
        raise DataError("crt needs a teacher (--teacher MODEL): a gmcert model or torch classifier")
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    run = {"config": config.as_dict(), "identity": identity or {}}
    record = {**run, "epochs_done": 0, "steps": 0, "history": [],
              "compute": {"student_forward_backward": 0, "teacher_forward": 0, "seconds": 0.0}}
    if checkpoint is not None and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, student, optimizer)
        if {k: saved.get(k) for k in run} != run:
            raise DataError(f"{checkpoint} belongs to another run (other data, encoder or settings); delete it "
                            "or rerun with the arguments it was started with")
        record = saved
    held_out = held_out or (images[:0], labels[:0])
    if monitor is not None and len(held_out[0]) > monitor:  # evenly spaced: sorted splits stay mixed
        rows = torch.linspace(0, len(held_out[0]) - 1, int(monitor)).round().long()
        held_out = tuple(part[rows.to(part.device)] for part in held_out)
    with tqdm(total=config.epochs, initial=record["epochs_done"], desc=f"train {config.method}", unit="epoch",
              disable=not progress, leave=False) as bar:  # closed on errors too: a message gets its own line
        _epochs(student, teacher, images, labels, config, optimizer, record, held_out, checkpoint, stop_after,
                bar)
    student.eval()
    return record


def _epochs(student, teacher, images, labels, config, optimizer, record, held_out, checkpoint, stop_after, bar):
    from gmcert.train.checkpoint import save_checkpoint

    device = next(student.parameters()).device
    use_amp = config.amp and device.type == "cuda"
    forward, w = _forward(student, config)
    autocast = ((lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if use_amp
                else contextlib.nullcontext)
    if device.type == "cuda":  # the data once on the device, not one host-to-device copy per batch
        images, labels = images.to(device), labels.to(device)
    done_here = 0
    while not finished(config, record) and (stop_after is None or done_here < stop_after):
        epoch = record["epochs_done"]
        steps_before, seconds_before = record.get("steps", 0), record["compute"]["seconds"]
        start, counts = time.perf_counter(), {"student_forward_backward": 0, "teacher_forward": 0}
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout and anything else on the global stream
        # each rank its own noise (the same for every rank would correlate the global batch)
        generator = _generator(device, config.seed * 1_000_003 + epoch + 7_919_000_000 * w.rank)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config, epoch, steps_before, seconds_before)
        student.train()
        # the losses stay on the device and are read once per epoch: no host sync per step
        total, batches = torch.zeros((), dtype=torch.float64, device=device), 0
        for begin in range(0, len(images), config.batch_size):
            index = order[begin:begin + config.batch_size]
            if len(index) < 2 * w.size and begin > 0:
                break  # BatchNorm needs two samples on every rank; the remainder is that small
            if config.max_steps is not None and steps_before + batches >= config.max_steps:
                break
            if config.time_budget is not None and batches and _out_of_time(config, seconds_before, start, w, device):
                break
            index = index[w.rank::w.size]  # this rank's slice of the global batch
            x, y = images[index.to(images.device)].to(device), labels[index.to(labels.device)].to(device)
            with autocast():
                loss = _batch_loss(student, forward, teacher, x, y, config, generator, counts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.detach(), batches + 1
        total = float(total)
        if not math.isfinite(total):  # a NaN or inf loss makes the sum one; this epoch is not checkpointed
            raise DataError(f"the training loss became {total} at epoch {epoch + 1}: lower --lr")
        if w.active:  # the record is the job's: counts summed, the loss averaged over ranks
            total, counts = _reduce(total, counts, device, w)
        seconds = time.perf_counter() - start
        clean, noisy = evaluate(student, *held_out, config.sigma, seed=config.seed + 10_000 * (epoch + 1))
        record["history"].append({"epoch": epoch + 1, "loss": total / max(batches, 1), "clean_accuracy": clean,
                                  "noisy_accuracy": noisy, "seconds": seconds, **counts})
        for key in counts:
            record["compute"][key] += counts[key]
        record["compute"]["seconds"] += seconds
        record["epochs_done"] = epoch + 1
        record["steps"] = steps_before + batches
        if checkpoint is not None and w.main:
            save_checkpoint(checkpoint, student, optimizer, record)
        if w.active:
            import torch.distributed as dist

            dist.barrier()  # the checkpoint is complete before any rank moves on
        done_here += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total / max(batches, 1):.3f}", noisy_acc=f"{noisy:.3f}")

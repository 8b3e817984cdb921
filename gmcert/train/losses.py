"""The training objectives of ``gmcert train``, on one batch (torch only).

Every method sees Gaussian-noised inputs x + eta, eta ~ N(0, sigma^2 I) in pixel space, the noise
that randomized smoothing certifies with (Cohen et al. 2019, section 4: train the base classifier
under the noise it will be smoothed with).

* ``gaussian``     CE(f(x + eta), y): Gaussian data augmentation, the baseline.
* ``consistency``  m noisy copies; mean CE + lambda * mean_i KL(p_bar || p_i) + eta_H * H(p_bar), p_bar the
                   mean of the copies' softmax (Jeong and Shin, NeurIPS 2020, their eq. 5).
* ``crt``          w * mean_b ||f_s(x + eta) - f_t(x + eta)||_2 + (1 - w) * CE(f_s(x + eta), y) on logits, the
                   teacher frozen and fed the same noisy input (Vaishnavi et al., NeurIPS 2022; w = 1 is
                   their default, and the norm is not squared).
* latent shaping   (any method) the within-class share of the latents' variance under noise,
                   tr(S_W) / tr(S_T) on the batch: scale-free, so it cannot be met by shrinking the
                   latents, and its minimum is tight class clusters around their means, which is what
                   the Gaussian-mixture head fitted afterwards models (class Gaussians, shared scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("gaussian", "consistency", "crt")


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + N(0, sigma^2 I), drawn from ``generator`` on x's device."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + sigma * noise


def gaussian_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def consistency_loss(logits: torch.Tensor, y: torch.Tensor, weight: float = 10.0,
                     entropy_weight: float = 0.5) -> torch.Tensor:
    """``logits`` ``(m, B, K)``: the m noisy copies of one batch."""
    m = logits.shape[0]
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(m))
    log_p = F.log_softmax(logits, dim=-1)
    p_bar = log_p.exp().mean(0)
    log_p_bar = torch.log(p_bar.clamp_min(1e-12))
    kl = (p_bar[None] * (log_p_bar[None] - log_p)).sum(-1).mean()  # KL(p_bar || p_i), mean over i and b
    entropy = -(p_bar * log_p_bar).sum(-1).mean()
    return ce + weight * kl + entropy_weight * entropy


def crt_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
             weight: float = 1.0) -> torch.Tensor:
    """The teacher's logits are detached here whatever the caller did: it receives no gradient."""
    distance = (student_logits - teacher_logits.detach()).norm(dim=1).mean()
    if weight == 1.0:
        return distance
    return weight * distance + (1.0 - weight) * F.cross_entropy(student_logits, y)


def shaping_penalty(features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """tr(S_W) / tr(S_T) of a batch of latents ``(B, D)``: within-class over total scatter, in [0, 1]."""
    features = features.flatten(1)
    total = (features - features.mean(0)).pow(2).sum()
    classes, index = torch.unique(y, return_inverse=True)
    sums = torch.zeros(len(classes), features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, index, features)
    counts = torch.bincount(index, minlength=len(classes)).to(features.dtype)
    within = (features - (sums / counts[:, None])[index]).pow(2).sum()
    return within / total.clamp_min(torch.finfo(features.dtype).tiny)

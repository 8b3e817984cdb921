"""Certified L2 radii of a logit classifier (pixels -> class scores) from its stored weights.

A classifier predicts ``y = argmax_j z_j(x)``. If the scores are ``z = W h(x) + b`` with ``h``
L_h-Lipschitz (a sound bound: :func:`gmcert.bounds.lipschitz.spectral_bound` of everything before
the last linear layer), each gap ``z_y - z_j`` is ``||w_y - w_j|| L_h``-Lipschitz, so no input
within

    r(x) = min_{j != y} (z_y - z_j) / (||w_y - w_j|| L_h)

changes the prediction. Without a final linear layer to split off, ``|dz_y - dz_j| <= sqrt(2) ||dz||``
gives the usual ``(z_y - z_runner-up) / (sqrt(2) L)`` with L the whole map's bound (Tsuzuku et al.
2018); the pairwise form is never larger, since ``||w_y - w_j|| <= sqrt(2) ||W||``.

The scores are those of :class:`gmcert.bounds.rounding.ForwardErrorBound`'s float64 pass, with
``err >= ||z^ - z||``; each computed gap is lowered by ``sqrt(2) err`` (``|e_y - e_j| <= sqrt(2) ||e||``)
before it is divided, and every radius is shaved by a relative 1e-9 (BRIEF sections 10 and 15), so
the radius holds for the exact function of the stored weights. Radius kind ``bound``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gmcert.bounds.convnorm import _SLACK
from gmcert.bounds.rounding import ForwardErrorBound

_SHAVE = 1.0 - 1e-9


@dataclass
class LogitRadii:
    """What :func:`logit_radii` returns.

    Attributes
    ----------
    prediction : ndarray ``(n,)``
        Argmax of the float64 scores.
    radius : ndarray ``(n,)``
        Certified L2 radius in input space, float64, 0 where the gap does not survive the rounding bound.
    lipschitz : float
        Sound bound on the whole map pixels -> scores.
    body_lipschitz : float or None
        Bound on the map before the last linear layer (None: not split off, the sqrt(2) L form is used).
    pair_norms : ndarray ``(K, K)`` or None
        ``||w_i - w_j||`` of the last linear layer, rounded up.
    err : ndarray ``(n,)``
        Bounds on the float64 scores' distance to the exact ones.
    """

    prediction: np.ndarray
    radius: np.ndarray
    lipschitz: float
    body_lipschitz: float | None
    pair_norms: np.ndarray | None
    err: np.ndarray


def _last_linear_weight(bound):
    """The last group's weight when it is a plain linear layer (no BatchNorm folded after it), else None."""
    group = bound._steps[-1].group
    if group.op.kind != "linear" or group.bn is not None or type(group.op.module) is not torch.nn.Linear:
        return None
    return group.op.module.weight.detach().double().cpu()


def pair_norms(weight) -> np.ndarray:
    """``(K, K)`` float64 ``||w_i - w_j||`` of a ``(K, d)`` weight, rounded up by the per-layer slack."""
    w = torch.as_tensor(weight, dtype=torch.float64)
    return ((w[:, None, :] - w[None, :, :]).square().sum(-1).sqrt() * _SLACK).numpy()


def gap_radii(scores, err, pair, body_lipschitz) -> tuple:
    """``(prediction, radius)`` from float64 scores ``(n, K)`` with error bounds ``err`` ``(n,)``.

    ``pair`` ``(K, K)`` is the Lipschitz bound of each gap ``z_i - z_j`` divided by ``body_lipschitz``
    (the pair norms of the last layer, or ``sqrt(2)`` everywhere off the diagonal for a whole-map bound).
    """
    scores, err = np.asarray(scores, dtype=np.float64), np.asarray(err, dtype=np.float64)
    prediction = scores.argmax(1)
    own = scores[np.arange(len(scores)), prediction][:, None]
    gaps = own - scores - math.sqrt(2.0) * err[:, None]  # lower bounds on the exact gaps
    slope = np.asarray(pair, dtype=np.float64)[prediction] * body_lipschitz
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = np.where(slope > 0, gaps / slope, np.where(gaps > 0, np.inf, 0.0))
    per_class[np.arange(len(scores)), prediction] = np.inf
    radius = np.clip(per_class.min(1), 0.0, None) * _SHAVE
    radius[~np.isfinite(err)] = 0.0
    return prediction, radius


def logit_radii(module, X, input_shape, pairwise: bool = True, batch_size: int = 256) -> LogitRadii:
    """Certified radii of ``module`` (eval mode, pixels -> scores) at the inputs ``X``.

    Parameters
    ----------
    module : torch.nn.Module
        Any module :mod:`gmcert.bounds.lipschitz` bounds; it is copied, never converted.
    X : array or tensor ``(n, *input_shape)``
    input_shape : (C, H, W)
    pairwise : bool, default True
        Split off a final ``nn.Linear`` and use its pair norms; False (or no such layer): the whole
        map's bound with sqrt(2).
    """
    bound = ForwardErrorBound(module, tuple(input_shape))
    scores, err = bound(X, batch_size=batch_size)
    weight = _last_linear_weight(bound) if pairwise else None
    k = scores.shape[1]
    if weight is None:
        body, pair = None, math.sqrt(2.0) * (1.0 - np.eye(k))
        prediction, radius = gap_radii(scores, err, pair, bound.lipschitz)
    else:
        body = float(np.prod([value for _, value in bound.layers[:-1]]))
        pair = pair_norms(weight)
        prediction, radius = gap_radii(scores, err, pair, body)
    return LogitRadii(prediction, radius, bound.lipschitz, body, pair if weight is not None else None, err)

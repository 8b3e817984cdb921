"""The fitted Gaussian-mixture head as a torch module, so the whole pipeline is one classifier
that randomized smoothing (or any torch tool) can call on pixels.

It computes the same class scores as ``GaussianMixtureClassifier.class_scores``
(BRIEF §2), from the component-level attributes every covariance type materialises.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class GaussianHead(nn.Module):
    """Class scores ``s_k(z)`` of a fitted ``GaussianMixtureClassifier``; input ``(N, d)``, output ``(N, K)``.

    The head's argmax is the classifier's prediction (as a class index into ``classes_``).
    ``dtype`` float32 is the fast default for smoothing, where the base classifier only has to be
    a fixed function; the closed-form certificates always use the float64 numpy path.
    """

    def __init__(self, clf, dtype=torch.float32):
        super().__init__()
        means = np.asarray(clf.component_means_)
        # P = L L^T (Cholesky of the precision): (z-mu)^T P (z-mu) = ||(z-mu) L||^2, one matmul per component.
        chol = np.linalg.cholesky(np.asarray(clf.component_precisions_))
        offset = -np.asarray(clf.component_log_dets_) + 2.0 * np.asarray(clf.component_log_weights_)
        self.register_buffer("means", torch.as_tensor(means, dtype=dtype))
        self.register_buffer("chol", torch.as_tensor(chol, dtype=dtype))
        self.register_buffer("offset", torch.as_tensor(offset, dtype=dtype))
        component_class = np.asarray(clf.component_class_)
        self.register_buffer("component_class", torch.as_tensor(component_class, dtype=torch.long))
        self.n_classes = len(clf.classes_)
        self.single_component = bool(len(component_class) == self.n_classes
                                     and np.array_equal(component_class, np.arange(self.n_classes)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.means.dtype)
        diff = z[:, None, :] - self.means[None]  # (N, M, d)
        whitened = torch.einsum("nmd,mde->nme", diff, self.chol)
        scores = -(whitened ** 2).sum(-1) + self.offset  # (N, M) component scores
        if self.single_component:
            return scores
        # Class score = 2 logsumexp over the class's components of s_m / 2.
        out = torch.full((z.shape[0], self.n_classes), -torch.inf, dtype=scores.dtype, device=z.device)
        for k in range(self.n_classes):
            members = scores[:, self.component_class == k] / 2
            out[:, k] = 2 * torch.logsumexp(members, dim=1)
        return out

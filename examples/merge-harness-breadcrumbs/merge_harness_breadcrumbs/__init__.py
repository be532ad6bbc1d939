"""Model Breadcrumbs (Davari and Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task
Model Merging with Sparse Masks"), as mergekit runs it (``merge_method: breadcrumbs``:
``mergekit/sparsify.py`` ``magnitude_outliers``, no sign consensus, no normalization): per
tensor, each task vector loses its largest ``gamma`` share of entries (outliers) and its
smallest entries down to ``density`` kept; the masked task vectors are summed and scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness import hp, require
from harness.engine.templates import SharedMerge


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """The kept entries of one task-vector tensor (float32 0/1), as mergekit's
    ``magnitude_outliers`` chooses them: ``int(gamma * n)`` largest magnitudes dropped, then the
    smallest until ``int(density * n)`` remain (fewer outliers dropped if the two overlap).

    Where ``int(gamma * n)`` is 0, nothing is dropped from the top, which is what the
    parameters say and what mergekit 0.1.5 does (its slice ``indices[n_bot:n_bot + target_n]``;
    earlier versions' ``indices[n_bot:-n_top]`` was empty then and dropped the whole tensor).
    ``tests/methods/test_mergekit_golden.py`` compares this method with mergekit's code."""
    if density >= 1:
        return torch.ones_like(tau)
    numel = tau.numel()
    target, top = int(density * numel), int(gamma * numel)
    bottom = numel - target - top
    if bottom < 0:
        top += bottom
        bottom = 0
    order = torch.sort(tau.abs().reshape(-1), descending=False).indices
    mask = torch.zeros_like(tau)
    mask.view(-1)[order[bottom:numel - top]] = 1
    return mask


@dataclass(frozen=True)
class Breadcrumbs(SharedMerge):
    """Model Breadcrumbs: ``theta_0 + lam * sum_t (m_t * tau_t)``, where ``m_t`` keeps, per
    tensor, the entries of ``tau_t`` between its ``density`` and ``1 - gamma`` magnitude cuts.

    - [decision] defaults: ``density = 0.9``, ``gamma = 0.01`` (the values of mergekit's
      breadcrumbs examples), ``lam = 0.3`` (each task vector's weight; the 8-task Task
      Arithmetic convention this harness's benchmarks use).
    """

    name = "breadcrumbs"
    display_name = "Model Breadcrumbs"
    family = "task vectors"
    year = 2024
    elementwise = False                      # a sort of each whole tensor
    density: float = hp(0.9, "share of each tensor's entries kept per task")
    gamma: float = hp(0.01, "share of each tensor's largest entries dropped per task")
    lam: float = hp(0.3, "weight of each masked task vector")

    def check(self):
        require(0 < self.density <= 1, self.name, "density",
                f"must be in (0, 1], got {self.density}")
        require(0 <= self.gamma < 1, self.name, "gamma", f"must be in [0, 1), got {self.gamma}")
        require(self.lam >= 0, self.name, "lam", f"must be >= 0, got {self.lam}")

    def rule(self, spec):
        def merge_key(key, theta0, taus, out):
            masked = [tau * breadcrumbs_mask(tau, self.density, self.gamma) for tau in taus]
            return theta0 + self.lam * torch.stack(masked).sum(dim=0)
        return merge_key

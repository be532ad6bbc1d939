"""DELLA-Merging (Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling"), as mergekit runs it (``merge_method: della``, the authors'
implementation: ``mergekit/sparsify.py`` ``della_magprune`` and
``merge_methods/generalized_task_arithmetic.py``): each task vector is pruned at random, per
row, with keep probabilities that grow with the entry's magnitude rank, rescaled to keep its L1
norm; then TIES's sign election and a disjoint mean, scaled by ``lam``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.engine.method import hp, require
from harness.engine.templates import SharedMerge
from harness.methods.dare import key_generator

RESCALE_EPS = 1e-7      # mergekit's guard: tiny norms are not rescaled


def magprune(tau: Tensor, density: float, epsilon: float,
             generator: torch.Generator) -> Tensor:
    """DELLA's MagPrune of one task-vector tensor (float32), as ``della_magprune`` with
    ``rescale_norm="l1"``: per row (a 1-D or 0-d tensor is one row), keep probabilities from
    ``density - epsilon`` (smallest magnitude) to ``density + epsilon`` (largest) linear in the
    magnitude rank, a Bernoulli draw from ``generator``, survivors scaled so the tensor keeps
    its L1 norm."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    order = torch.argsort(rows.abs(), dim=1, descending=False, stable=True)
    ranks = order.argsort(dim=1).to(torch.float32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    # a row of one entry has no rank spread (mergekit divides 0 by 0): it is kept with
    # probability density
    rank_norm = torch.where(high > low, ((ranks - low) / (high - low)).clamp(0, 1), 0.5)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator)
    masked = rows * mask
    before, after = rows.abs().sum(), masked.abs().sum()
    if before >= RESCALE_EPS and after >= RESCALE_EPS:
        masked = masked * (before / after)
    return masked.reshape(tau.shape)


def disjoint_mean(deltas: Tensor) -> Tensor:
    """mergekit's consensus ``sum`` with ``normalize``: the sign of the summed deltas (0 counts
    as +), then the mean of the entries that have it (at least 1 in the divisor)."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = (deltas.sign() == majority).to(deltas.dtype)
    mixed = (deltas * agree).sum(dim=0)
    divisor = agree.sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed / divisor


@dataclass(frozen=True)
class Della(SharedMerge):
    """DELLA: ``theta_0 + lam * mean over agreeing signs of MagPrune(tau_t)``.

    - [decision: mergekit's defaults where it has them] ``epsilon = 0.15``, ``lam = 1.0``, every
      task weighted 1, the disjoint mean (``normalize``) and L1 rescaling; ``density = 0.5``
      (mergekit's default, 1.0, prunes nothing; 0.5 is DARE's drop rate here).
    - [decision] the Bernoulli draws are seeded per (seed, task, key) as DARE's here (mergekit
      draws from the global random state), and magnitude ranks break ties by position (a
      stable sort; mergekit's unstable one is platform-dependent on ties).
    """

    name = "della"
    display_name = "DELLA"
    family = "task vectors"
    year = 2024
    elementwise = False              # ranks over whole rows
    density: float = hp(0.5, "mean keep probability of each task-vector entry")
    epsilon: float = hp(0.15, "half-width of the keep probabilities around density")
    lam: float = hp(1.0, "scaling coefficient of the merged task vector")
    seed: int = hp(0, "random seed of the prune masks")

    def check(self):
        require(0 < self.density <= 1, self.name, "density",
                f"must be in (0, 1], got {self.density}")
        require(self.density >= 1 or 0 < self.density - self.epsilon
                and self.density + self.epsilon < 1, self.name, "epsilon",
                f"must keep density +/- epsilon inside (0, 1), got {self.epsilon} around "
                f"{self.density}")
        require(self.lam >= 0, self.name, "lam", f"must be >= 0, got {self.lam}")

    def rule(self, spec):
        def merge_key(key, theta0, taus, out):
            pruned = [magprune(tau, self.density, self.epsilon, key_generator(self.seed, t, key))
                      for t, tau in zip(spec.tasks, taus)]
            mixed = disjoint_mean(torch.stack(pruned))
            if self.lam != 1:
                mixed = mixed * self.lam
            return theta0 + mixed
        return merge_key

"""Task Arithmetic (Ilharco et al., ICLR 2023, "Editing models with task arithmetic")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core import fused
from harness.engine.method import hp, require
from harness.engine.templates import SharedMerge


def sum_task_vectors(taus: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """``sum_t tau_t`` accumulated in task order (a new tensor, or in ``out``); the first two
    are added straight into the result (one pass fewer than copying the first: same bits)."""
    if len(taus) == 1:
        return taus[0].clone() if out is None else out.copy_(taus[0])
    total = torch.add(taus[0], taus[1], out=out)
    for tau in taus[2:]:
        total += tau
    return total


def task_arithmetic(theta0: Tensor, taus: Sequence[Tensor], lam: float,
                    out: Tensor | None = None) -> Tensor:
    """``theta_0 + lam * sum_t tau_t`` in float32 (a new tensor, or in ``out``), computed in
    place on the sum: same bits, no temporaries."""
    return sum_task_vectors(taus, out=out).mul_(lam).add_(theta0)


@dataclass(frozen=True)
class TaskArithmetic(SharedMerge):
    """``theta = theta_0 + lam * sum_t tau_t`` with the benchmark's lam = 0.3."""

    name = "task-arithmetic"
    display_name = "Task Arithmetic"
    family = "task vectors"
    year = 2023
    propagates_nonfinite = True      # theta_0 + lam * sum: every NaN/Inf shows
    parallel_blocks = True           # a pure function of each block
    lam: float = hp(0.3, "scaling coefficient of the summed task vectors")

    def check(self):
        require(self.lam >= 0, self.name, "lam", f"must be >= 0, got {self.lam}")

    def rule(self, spec):
        return lambda key, theta0, taus, out: task_arithmetic(theta0, taus, self.lam, out)

    def fused_rule(self, spec):
        if not fused.available():
            return None
        return lambda out, theta0, sources: fused.task_arithmetic(out, theta0, sources, self.lam)

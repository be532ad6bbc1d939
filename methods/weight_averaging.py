"""Weight averaging (Wortsman et al., 2022, "Model soups")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core import fused
from harness.engine.templates import SharedMerge


def weight_average(weights: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """``mean_t w_t``, accumulated in float64 so identical models average to themselves; the
    float32 result is a new tensor, or written into ``out`` (the same rounding)."""
    total = weights[0].to(torch.float64)
    for w in weights[1:]:
        total += w
    total.div_(len(weights))
    return total.to(torch.float32) if out is None else out.copy_(total)


@dataclass(frozen=True)
class WeightAveraging(SharedMerge):
    """``theta = mean_t theta_t``: one shared model, no hyperparameters.

    [decision] The mean is accumulated in float64 before the cast back, so that averaging N
    copies of one model returns that model bit for bit (a float32 sum would round). Large keys
    go through in row blocks (the rule is elementwise: same bits).
    """

    name = "weight-averaging"
    display_name = "Weight Averaging"
    family = "averaging"
    year = 2022
    merges_weights = True
    propagates_nonfinite = True      # a mean: every NaN/Inf shows
    parallel_blocks = True           # a pure function of each block

    def rule(self, spec):
        return lambda key, theta0, weights, out: weight_average(weights, out)

    def fused_rule(self, spec):
        return fused.weight_average if fused.available() else None

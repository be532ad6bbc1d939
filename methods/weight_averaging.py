"""Weight averaging (Wortsman et al., 2022, "Model soups")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.method import MergeMethod
from harness.result import MergeResult
from harness.state_dict import inspect_models, merge_shared


def weight_average(weights: Sequence[Tensor]) -> Tensor:
    """``mean_t w_t``, accumulated in float64 so identical models average to themselves."""
    total = weights[0].to(torch.float64)
    for w in weights[1:]:
        total += w
    return (total / len(weights)).to(torch.float32)


@dataclass(frozen=True)
class WeightAveraging(MergeMethod):
    """``theta = mean_t theta_t``: one shared model, no hyperparameters.

    [decision] The mean is accumulated in float64 before the cast back, so that averaging N
    copies of one model returns that model bit for bit (a float32 sum would round). Large keys
    go through in row blocks (the rule is elementwise: same bits).
    """

    name = "weight-averaging"

    def merge(self, pretrained, finetuned, *, progress=False):
        spec = inspect_models(pretrained, finetuned, values=False)  # values: checked merging
        base = merge_shared(pretrained, finetuned, spec,
                            lambda key, theta0, weights: weight_average(weights),
                            self.name, progress, elementwise=True, weights=True)
        return MergeResult(self.name, self.params(), base, spec.tasks,
                           merged_params=spec.merged_params)

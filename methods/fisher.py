"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging models with Fisher-weighted
averaging"), as FusionBench runs it (``fusion_bench/method/fisher_merging/fisher_merging.py``
and ``clip_fisher_merging.py``): every parameter is the average of the task models weighted
entry by entry by each model's diagonal Fisher information, estimated on unlabeled examples of
its task from the model's own predicted distribution.

- Per batch, ``sum_{examples, classes} sqrt(p) * log p`` of the task model's softmax ``p``
  (``p`` detached) is differentiated once, and the squares of its gradient are summed over
  batches, then divided by the number of examples (FusionBench's estimate, batch-level
  squares).
- Each model's Fisher is normalised by its L2 norm over every merged parameter (keys in sorted
  order; the inverse norms summed to 1), times the scaling coefficient ``1/N``; ``1e-6`` is added to every Fisher
  entry; ``theta = sum_t c_t F_t theta_t / sum_t c_t F_t``.
- It sees data: unlabeled examples of each task's validation split and the task's head (never
  merged), from a suite whose :class:`~harness.core.data.TaskInputs` has ``task_model``.
- [decision] A backbone parameter that gets no gradient (unused by the classifier), or a float
  buffer (batch-norm statistics), has Fisher 0: its merge is then the normalised average; FusionBench would fail there, as it would on a 0-d
  parameter (its per-model norm reduces over every dimension), whose norm here is ``|F_t|``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.core.tensors import to_float32
from harness.engine.method import hp, require
from harness.engine.result import MergeResult
from harness.engine.templates import DataMerge


def diagonal_fisher(model: nn.Module, batches, keys: list[str]) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model``'s parameters ``backbone.<key>`` for ``keys`` over
    ``batches`` (float32, key -> tensor), as FusionBench estimates it."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    state = model.state_dict(keep_vars=True)    # parameters and buffers (no gradient: Fisher 0)
    totals: dict[str, Tensor] = {}
    examples = 0
    for batch in batches:
        logits = model(batch)
        probabilities = torch.softmax(logits, dim=-1).detach()
        log_probabilities = torch.log_softmax(logits, dim=-1)
        expectation = (torch.sqrt(probabilities) * log_probabilities).sum(dim=-1).sum(dim=0)
        model.zero_grad()
        expectation.backward()
        for key in keys:
            value = state[f"backbone.{key}"]
            grad = value.grad if isinstance(value, nn.Parameter) else None
            square = (torch.zeros_like(value, dtype=torch.float32) if grad is None
                      else grad.detach() ** 2)
            totals[key] = square if key not in totals else totals[key] + square
        examples += len(batch)
    return {key: total / examples for key, total in totals.items()}


def fisher_weighted_average(weights: Mapping[str, list[Tensor]],
                            fishers: list[dict[str, Tensor]], *, minimal: float = 1e-6,
                            normalize: bool = True) -> dict[str, Tensor]:
    """FusionBench's ``merging_with_fisher_weights`` with scaling coefficients ``1/N``: per
    key, ``sum_t c_t F_t w_t / sum_t c_t F_t`` (float32), the same operations."""
    n = len(fishers)
    coefficients = torch.ones(n) / n
    if normalize:
        per_key = []
        for key in sorted(weights):     # the same bits whatever order the inputs list keys in
            stacked = torch.stack([f[key] for f in fishers])
            per_key.append(torch.linalg.vector_norm(stacked, dim=list(range(1, stacked.dim())))
                           if stacked.dim() > 1 else stacked.abs())     # a 0-d parameter
        norms = torch.norm(torch.stack(per_key, dim=1), dim=1)
    merged = {}
    for key, values in weights.items():
        stacked = torch.stack(values, dim=0)
        fisher = torch.stack([f[key] for f in fishers], dim=0) + minimal
        scaling = coefficients.reshape(-1, *[1] * (stacked.dim() - 1))
        if normalize:
            inverse = 1.0 / (norms + minimal)
            scaling = scaling * (inverse / inverse.sum()).reshape(-1, *[1] * (stacked.dim() - 1))
        merged[key] = (scaling * fisher * stacked).sum(dim=0) / (scaling * fisher).sum(dim=0)
    return merged


@dataclass(frozen=True)
class Fisher(DataMerge):
    """Fisher merging: every parameter averaged with weights from each task model's diagonal
    Fisher information. Sees unlabeled examples of each task and its head."""

    name = "fisher"
    display_name = "Fisher Merging"
    family = "data-dependent"
    year = 2022
    needs_data = ("each task model's predictions on unlabeled task examples (diagonal Fisher, "
                  "through the task's head)")
    needs_task_models = True
    examples: int = hp(256, "unlabeled examples per task (validation split)")
    batch_size: int = hp(32, "examples per backward pass")
    minimal_fisher_weight: float = hp(1e-6, "added to every Fisher entry")

    def check(self):
        require(self.examples >= 1, self.name, "examples", f"must be >= 1, got {self.examples}")
        require(self.batch_size >= 1, self.name, "batch_size",
                f"must be >= 1, got {self.batch_size}")
        require(self.minimal_fisher_weight > 0, self.name, "minimal_fisher_weight",
                f"must be > 0, got {self.minimal_fisher_weight}")

    def merge_with_data(self, spec, pretrained, finetuned, data, progress):
        keys = list(spec.float_keys)
        with torch.enable_grad():
            fishers = [diagonal_fisher(data.task_model(t, finetuned[t]), data.batches[t], keys)
                       for t in spec.tasks]
        weights = {key: [to_float32(finetuned[t][key]) for t in spec.tasks] for key in keys}
        merged_keys = fisher_weighted_average(weights, fishers,
                                              minimal=self.minimal_fisher_weight)
        merged = {key: merged_keys[key].to(value.dtype) if key in merged_keys else value
                  for key, value in pretrained.items()}
        return MergeResult(self.name, self.params(), merged, spec.tasks,
                           merged_params=spec.merged_params, info={"data": data.summary()})

"""EMR-Merging (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-free high-performance model
merging"): a unified task vector plus a per-task sign mask and rescaler."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core.tensors import BlockBuffers
from harness.engine.masked import MaskedSharedMerge, MaskRule


def emr_elect(taus: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``tau_uni`` and the stacked masks ``M_t`` of one tensor key.

    ``flag = +1 where mean_t tau_t > 0 else -1``; ``M_t = tau_t * flag > 0``;
    ``tau_uni = flag * max_t |tau_t * M_t|``.
    """
    stacked = torch.stack(list(taus))
    flag = torch.where(stacked.mean(dim=0) > 0, 1.0, -1.0)
    masks = stacked * flag > 0
    tau_uni = flag * (stacked * masks).abs().amax(dim=0)
    return tau_uni, masks


def _elect_and_sum(sums: Tensor, buffers: BlockBuffers, taus: Sequence[Tensor]
                   ) -> tuple[Tensor, Tensor]:
    """:func:`emr_elect` of a block, same bits in fewer passes, adding each task's
    ``sum|tau_t|`` and ``sum|tau_uni * M_t|`` to ``sums`` (float64, rows 0 and 1) for lambda.
    Works in ``buffers``: the results are valid until the next call.

    ``tau_t * flag`` is ``|tau_t|`` exactly where ``M_t`` holds, so ``max_t |tau_t * M_t|`` is
    the largest of them clamped at 0 (``abs_`` turns a -0.0 there into emr_elect's +0.0);
    comparisons write float32 (several times faster than bool on the CPU), and the float64
    sums cast first (``sum(dtype=float64)`` casts element by element, far slower).
    """
    stacked = torch.stack(list(taus), out=buffers.view("stacked", taus[0], count=len(taus)))
    flag = torch.mean(stacked, dim=0, out=buffers.view("flag", taus[0]))
    flag = torch.gt(flag, 0, out=flag).mul_(2).sub_(1)        # +1 where the mean is > 0, else -1
    wide = buffers.view("float64", taus[0], torch.float64)
    for row, tau in enumerate(stacked):
        sums[0, row] += float(wide.copy_(tau).abs_().sum())
    aligned = stacked.mul_(flag)
    kept = torch.gt(aligned, 0, out=buffers.view("kept", aligned))      # M_t as 1.0 / 0.0
    masks = buffers.view("masks", kept, torch.bool).copy_(kept)
    magnitude = torch.amax(aligned.clamp_(min=0), dim=0, out=buffers.view("uni", flag)).abs_()
    for row in range(len(kept)):
        sums[1, row] += float(wide.copy_(kept[row].mul_(magnitude)).sum())
    return magnitude.mul_(flag), masks


class _EmrRule(MaskRule):
    """Elects tau_uni and the masks, and sums each task's per-key means for its lambda."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks
        self.buffers = BlockBuffers()
        self.sums = torch.zeros(2, len(tasks), dtype=torch.float64)   # sum|tau_t|, |uni*M_t|
        self.numerator = dict.fromkeys(tasks, 0.0)
        self.denominator = dict.fromkeys(tasks, 0.0)

    def block(self, taus):
        return _elect_and_sum(self.sums, self.buffers, taus)

    def key_done(self, stored, numel):
        if stored:
            count = max(1, numel)
            for row, task in enumerate(self.tasks):
                self.numerator[task] += float(self.sums[0, row]) / count
                self.denominator[task] += float(self.sums[1, row]) / count
        self.sums.zero_()


@dataclass(frozen=True)
class Emr(MaskedSharedMerge):
    """EMR-Merging: task weights ``theta_0 + lambda_t * (M_t * tau_uni)``, no hyperparameters.

    - [decision: code over paper] ``lambda_t = sum_n mean|tau_t[n]| / sum_n mean|tau_uni[n] *
      M_t[n]|`` sums per-tensor means over tensors, as the authors' code does.
    - [decision: the authors' code divides by zero and returns inf] a task whose masks are all
      empty gets ``lambda_t = 0`` and a warning naming it.
    - [decision] the per-tensor means are accumulated in float64 (the authors' float32 means
      differ in about the 7th digit), so that large keys can go through in row blocks: tau_uni
      and the masks keep their bits, lambda moves only by float64 rounding (~1e-16).
    - Shared: theta_0 and tau_uni; payload: a 1-bit mask per entry plus one float32 per task.
      Unseen tasks get the unified model ``theta_0 + tau_uni`` (paper, appendix B.2).
    """

    name = "emr"
    display_name = "EMR-Merging"
    family = "masks"
    year = 2024
    shared_name = "tau_uni"

    def mask_rule(self, spec):
        return _EmrRule(spec.tasks)

    def finish(self, rule, spec):
        scales = {}
        for task in spec.tasks:
            if rule.denominator[task] == 0:
                warnings.warn(f"emr: task {task!r} has empty masks everywhere: nothing to "
                              "rescale, lambda set to 0", stacklevel=3)
                scales[task] = 0.0
            else:
                scales[task] = rule.numerator[task] / rule.denominator[task]
        return scales, {"shared": "tau_uni", "scale": 1.0}, {"lambda": scales}

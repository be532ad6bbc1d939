"""TALL-Mask (Wang et al., ICML 2024, "Localizing task information for improved model merging
and compression"): per-task masks over the multi-task vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core.errors import MergeInputError
from harness.core.tensors import BlockBuffers
from harness.engine.masked import MaskedSharedMerge, MaskRule
from harness.engine.method import TunedPerTask, hp, require
from harness.methods.task_arithmetic import sum_task_vectors


def tall_masks(taus: Sequence[Tensor], lams: Sequence[float],
               buffers: BlockBuffers | None = None) -> tuple[Tensor, list[Tensor]]:
    """``tau_MTL = sum_t tau_t`` and ``m_t = |tau_t| > lam_t * |tau_MTL - tau_t|`` (strict).

    Compares into float32 (several times faster than into bool on the CPU) before the cast to
    bool. Works in ``buffers`` (results valid until their next use), else in new tensors.
    """
    buffers = BlockBuffers() if buffers is None else buffers
    mtl = sum_task_vectors(taus, out=buffers.view("mtl", taus[0]))
    bound, magnitude = buffers.view("bound", mtl), buffers.view("magnitude", mtl)
    masks = buffers.view("masks", mtl, torch.bool, len(taus))
    for mask, tau, lam in zip(masks, taus, lams):
        torch.sub(mtl, tau, out=bound).abs_().mul_(lam)
        mask.copy_(torch.gt(torch.abs(tau, out=magnitude), bound, out=bound))
    return mtl, list(masks)


class _TallRule(MaskRule):
    def __init__(self, lams: list[float]) -> None:
        self.lams, self.buffers = lams, BlockBuffers()

    def block(self, taus):
        return tall_masks(taus, self.lams, self.buffers)


@dataclass(frozen=True)
class TallMask(MaskedSharedMerge):
    """TALL-Mask: task weights ``theta_0 + m_t * tau_MTL``; payload a 1-bit mask per task.

    - [decision] masks are computed on task vectors, ``|tau_t| > lam * |tau_MTL - tau_t|``; the
      authors compute it on weights, which is algebraically equal but can differ in the last bit.
    - [decision] ``lam`` is one number or a mapping task -> lam; the runner chooses it per task
      by validation accuracy from {0.2, ..., 0.6} (``tuned_per_task``), which has the data.
      With no validation split, the fixed default 0.4.
    - Unseen tasks get the Task-Arithmetic model ``theta_0 + unseen_lam * tau_MTL`` (paper,
      Table 4 gives TALL-Mask exactly Task Arithmetic's unseen scores).
    """

    name = "tall-mask"
    display_name = "TALL-Mask"
    family = "masks"
    year = 2024
    shared_name = "tau_mtl"
    tuned_per_task = TunedPerTask("lam", (0.2, 0.3, 0.4, 0.5, 0.6))
    lam: float | dict[str, float] = hp(0.4, "mask threshold, one value or task -> value")
    unseen_lam: float = hp(0.3, "Task Arithmetic coefficient served to unseen tasks")

    def check(self):
        values = self.lam.values() if isinstance(self.lam, dict) else [self.lam]
        for value in values:
            require(value >= 0, self.name, "lam", f"must be >= 0, got {value}")

    def lam_for(self, task: str) -> float:
        if not isinstance(self.lam, dict):
            return self.lam
        if task not in self.lam:
            raise MergeInputError(f"tall-mask: no lam given for task {task!r}")
        return self.lam[task]

    def mask_rule(self, spec):
        return _TallRule([self.lam_for(t) for t in spec.tasks])

    def finish(self, rule, spec):
        return (None, {"shared": "tau_mtl", "scale": self.unseen_lam},
                {"lam": dict(zip(spec.tasks, rule.lams))})

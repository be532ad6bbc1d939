"""TALL-Mask (Wang et al., ICML 2024, "Localizing task information for improved model merging
and compression"): per-task masks over the multi-task vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from harness.method import MergeMethod, hp, require
from harness.payload import Mask
from harness.result import MergeResult, TaskPayload
from harness.sharded import building, finish_output
from harness.state_dict import (BlockBuffers, MergeInputError, ValueChecks, inspect_models,
                                iter_keys, shared_and_masks)
from methods.task_arithmetic import sum_task_vectors


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


@dataclass(frozen=True)
class TallMask(MergeMethod):
    """TALL-Mask: task weights ``theta_0 + m_t * tau_MTL``; payload a 1-bit mask per task.

    - [decision] masks are computed on task vectors, ``|tau_t| > lam * |tau_MTL - tau_t|``; the
      authors compute it on weights, which is algebraically equal but can differ in the last bit.
    - [decision] ``lam`` is one number or a mapping task -> lam; choosing it per task by
      validation accuracy (from {0.2, ..., 0.6}) is the runner's job, which has the data.
      With no validation split, the fixed default 0.4.
    - Unseen tasks get the Task-Arithmetic model ``theta_0 + unseen_lam * tau_MTL`` (paper,
      Table 4 gives TALL-Mask exactly Task Arithmetic's unseen scores).
    """

    name = "tall-mask"
    kind = "personalized"
    per_task_grid: ClassVar[tuple[str, tuple[float, ...]]] = ("lam", (0.2, 0.3, 0.4, 0.5, 0.6))
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

    def merge(self, pretrained, finetuned, *, progress=False):
        spec = inspect_models(pretrained, finetuned, values=False)  # values: checked merging
        checks = ValueChecks(spec)
        tasks = spec.tasks
        lams = [self.lam_for(t) for t in tasks]
        records: dict[str, dict] = {t: {} for t in tasks}
        buffers = BlockBuffers()
        with building("tau_mtl") as tau_mtl:
            for key in iter_keys(spec.float_keys, self.name, progress):
                mtl, masks = shared_and_masks(pretrained, finetuned, spec, key,
                                              lambda taus: tall_masks(taus, lams, buffers), checks)
                if checks.unchanged(key):
                    continue
                tau_mtl[key] = mtl
                for t, bits in zip(tasks, masks):
                    records[t][key] = Mask(bits, tuple(mtl.shape))
            checks.finish()
            tau_mtl = finish_output(tau_mtl)
        return MergeResult(self.name, self.params(), pretrained, tasks, kind=self.kind,
                           payloads={t: TaskPayload(r, shared="tau_mtl") for t, r in records.items()},
                           shared={"tau_mtl": tau_mtl}, merged_params=spec.merged_params,
                           unseen={"shared": "tau_mtl", "scale": self.unseen_lam},
                           info={"lam": dict(zip(tasks, lams))})

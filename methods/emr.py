"""EMR-Merging (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-free high-performance model
merging"): a unified task vector plus a per-task sign mask and rescaler."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.method import MergeMethod
from harness.payload import Mask
from harness.result import MergeResult, TaskPayload
from harness.sharded import building, finish_output
from harness.state_dict import (BlockBuffers, ValueChecks, inspect_models, iter_keys,
                                shared_and_masks)


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


@dataclass(frozen=True)
class Emr(MergeMethod):
    """EMR-Merging; task weights ``theta_0 + lambda_t * (M_t * tau_uni)``, no hyperparameters.

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
    kind = "personalized"

    def merge(self, pretrained, finetuned, *, progress=False):
        spec = inspect_models(pretrained, finetuned, values=False)  # values: checked merging
        checks = ValueChecks(spec)
        tasks = spec.tasks
        records: dict[str, dict] = {t: {} for t in tasks}
        numerator = {t: 0.0 for t in tasks}
        denominator = {t: 0.0 for t in tasks}
        buffers = BlockBuffers()
        with building("tau_uni") as tau_uni:
            for key in iter_keys(spec.float_keys, self.name, progress):
                sums = torch.zeros(2, len(tasks), dtype=torch.float64)  # sum|tau_t|, |uni*M_t|
                uni, bits = shared_and_masks(pretrained, finetuned, spec, key,
                                             functools.partial(_elect_and_sum, sums, buffers),
                                             checks)
                if checks.unchanged(key):
                    continue
                tau_uni[key] = uni
                count = max(1, uni.numel())
                for row, (t, packed) in enumerate(zip(tasks, bits)):
                    numerator[t] += float(sums[0, row]) / count
                    denominator[t] += float(sums[1, row]) / count
                    records[t][key] = Mask(packed, tuple(uni.shape))
            checks.finish()
            tau_uni = finish_output(tau_uni)
        payloads, scales = {}, {}
        for t in tasks:
            if denominator[t] == 0:
                warnings.warn(f"emr: task {t!r} has empty masks everywhere: nothing to rescale, "
                              "lambda set to 0", stacklevel=2)
                scales[t] = 0.0
            else:
                scales[t] = numerator[t] / denominator[t]
            payloads[t] = TaskPayload(records[t], torch.tensor(scales[t], dtype=torch.float32),
                                      shared="tau_uni")
        return MergeResult(self.name, self.params(), pretrained, tasks, kind=self.kind,
                           payloads=payloads, shared={"tau_uni": tau_uni},
                           merged_params=spec.merged_params,
                           unseen={"shared": "tau_uni", "scale": 1.0},
                           info={"lambda": scales})

"""DARE-TIES (Yu et al., ICML 2024, "Language models are Super Mario", DARE combined with
TIES-Merging), as FusionBench runs it (``fusion_bench/method/dare/ties_merging.py``): each task
vector dropped and rescaled by DARE, then TIES (trim, elect, disjoint merge) over the dropped
task vectors, ``theta_0 + lam * merged``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from harness.core.tensors import StateDict, task_vector
from harness.engine.method import MergeMethod, hp, require
from harness.engine.passes import inspect_models
from harness.engine.result import MergeResult
from harness.methods.dare import drop_and_rescale, key_generator
from harness.methods.ties import inspect_for_ties, ties_merge


class _DroppedTaskVector(Mapping):
    """Task ``task``'s DARE-dropped task vector, key by key (float32), computed when read: the
    same bits on every read, since each key's drop is seeded by (seed, task, key)."""

    def __init__(self, pretrained: StateDict, finetuned: StateDict, task: str, p: float,
                 seed: int) -> None:
        self._pretrained, self._finetuned = pretrained, finetuned
        self._task, self._p, self._seed = task, p, seed

    def __getitem__(self, key: str) -> Tensor:
        base = self._pretrained[key]
        if not base.is_floating_point():
            return base
        tau = task_vector(base.to(torch.float32), self._finetuned[key].to(torch.float32))
        return drop_and_rescale(tau, self._p, key_generator(self._seed, self._task, key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._pretrained)

    def __len__(self) -> int:
        return len(self._pretrained)


class _Origin(Mapping):
    """The zero model the dropped task vectors are measured from (integer buffers kept)."""

    def __init__(self, pretrained: StateDict) -> None:
        self._pretrained = pretrained

    def __getitem__(self, key: str) -> Tensor:
        value = self._pretrained[key]
        if not value.is_floating_point():
            return value
        return torch.zeros(value.shape, dtype=torch.float32, device=value.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._pretrained)

    def __len__(self) -> int:
        return len(self._pretrained)


@dataclass(frozen=True)
class DareTies(MergeMethod):
    """DARE-TIES: ``theta_0 + lam * TIES(DARE_p(tau_1), ..., DARE_p(tau_N))``.

    TIES runs on the dropped task vectors as models measured from a zero origin, so its trim
    thresholds, elected signs and disjoint merge see exactly the dropped values (no rounding
    through ``theta_0 + d - theta_0``); ``theta_0`` is added last, as the reference does.

    - [decision: FusionBench's defaults] ``p = 0.5`` with rescaling, ``k = 20``, disjoint
      ``sum``, ``lam = 0.5``; drops are seeded per (seed, task, key) as DARE's here (FusionBench
      draws from the global random state).
    - The merged model is built in memory (the sum with ``theta_0`` is a last pass over TIES's
      output), not streamed.
    """

    name = "dare-ties"
    display_name = "DARE-TIES"
    family = "task vectors"
    year = 2024
    p: float = hp(0.5, "drop probability of each task-vector entry")
    k: float = hp(20.0, "TIES percent of each dropped task vector kept")
    merge_function: Literal["sum", "mean"] = hp("sum", "TIES disjoint merge")
    lam: float = hp(0.5, "scaling coefficient of the merged task vector")
    seed: int = hp(0, "random seed of the drop masks")

    def check(self):
        require(0 <= self.p < 1, self.name, "p", f"must be in [0, 1), got {self.p}")
        require(0 < self.k <= 100, self.name, "k", f"must be in (0, 100], got {self.k}")
        require(self.merge_function in ("sum", "mean"), self.name, "merge_function",
                "must be 'sum' or 'mean'")
        require(self.lam >= 0, self.name, "lam", f"must be >= 0, got {self.lam}")

    def merge(self, pretrained, finetuned, *, progress=False):
        spec = inspect_models(pretrained, finetuned)       # the usual checks, on the inputs
        origin = _Origin(pretrained)
        dropped = {t: _DroppedTaskVector(pretrained, finetuned[t], t, self.p, self.seed)
                   for t in spec.tasks}
        ties_spec, thresholds = inspect_for_ties(origin, dropped)
        merged = ties_merge(origin, dropped, ties_spec, thresholds, k=self.k,
                            merge=self.merge_function, lam=self.lam, progress=progress,
                            desc="dare-ties")
        base = {}
        for key in pretrained:
            theta0 = pretrained[key]
            if key in spec.float_keys:
                base[key] = (theta0.to(torch.float32) + merged[key]).to(theta0.dtype)
            else:
                base[key] = theta0
        return MergeResult(self.name, self.params(), base, spec.tasks,
                           merged_params=spec.merged_params)

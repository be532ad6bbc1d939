"""TIES-Merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving interference when merging
models"), as the authors' code and the 8-task benchmark run it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from harness.method import MergeMethod, hp, require
from harness.result import MergeResult
from harness.state_dict import (ModelSpec, StateDict, cast_like, inspect_models, iter_keys,
                                task_vectors, to_float32)

_BINS = 1 << 16


class StreamingKthSmallest:
    """The exact k-th smallest (1-indexed) of non-negative float32 values, seen in two passes.

    Non-negative float32 bit patterns order like the values, so a histogram of the high 16 bits
    (pass 1) finds the bin holding the k-th value and a histogram of the low 16 bits inside that
    bin (pass 2) finds the value itself. Memory: two 65,536-bin histograms, whatever the model.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.high = torch.zeros(_BINS, dtype=torch.int64)
        self.low = torch.zeros(_BINS, dtype=torch.int64)
        self.bin: int | None = None
        self.rank = 0

    def add_high(self, values: Tensor) -> None:
        bits = values.reshape(-1).view(torch.int32) >> 16
        self.high += torch.bincount(bits, minlength=_BINS)

    def choose_bin(self) -> None:
        cum = self.high.cumsum(0)
        self.bin = int(torch.searchsorted(cum, self.k))
        self.rank = self.k - (int(cum[self.bin - 1]) if self.bin > 0 else 0)

    def add_low(self, values: Tensor) -> None:
        bits = values.reshape(-1).view(torch.int32)
        inside = bits[(bits >> 16) == self.bin] & 0xFFFF
        self.low += torch.bincount(inside, minlength=_BINS)

    def value(self) -> float:
        low = int(torch.searchsorted(self.low.cumsum(0), self.rank))
        word = torch.tensor([(self.bin << 16) | low], dtype=torch.int32)
        return float(word.view(torch.float32))


def trim_rank(d: int, k: float) -> int:
    """The 1-indexed rank of the trim threshold among ``d`` magnitudes: ``d - int(d * k/100)``."""
    return d - int(d * (k / 100))


def disjoint_aggregate(selected: Tensor, merge: str) -> Tensor:
    """Sum, or mean over the non-zero count (at least 1), of sign-agreeing entries (dim 0)."""
    total = selected.sum(dim=0)
    if merge == "sum":
        return total
    return total / torch.clamp((selected != 0).sum(dim=0).to(torch.float32), min=1)


def elect_and_merge(trimmed: Tensor, merge: str) -> tuple[Tensor, Tensor]:
    """TIES elect + disjoint merge of stacked trimmed task vectors ``(N, ...)``.

    Returns the merged delta (0 where the elected sign is 0) and the elected sign, so the caller
    can settle those entries with the whole model's majority sign.
    """
    sign = torch.sign(trimmed.sum(dim=0))
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0) & (sign != 0)
    return disjoint_aggregate(trimmed * agree, merge), sign


def settle_undecided(columns: Tensor, majority: int, merge: str) -> Tensor:
    """Merge entries whose elected sign is 0 with the model's majority sign (0 -> merge to 0)."""
    if majority == 0:
        return torch.zeros(columns.shape[1:], dtype=columns.dtype)
    agree = columns > 0 if majority > 0 else columns < 0
    return disjoint_aggregate(columns * agree, merge)


def ties_merge(pretrained: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec, *,
               k: float = 20.0, merge: str = "sum", lam: float = 0.3,
               progress: bool = False, desc: str = "ties") -> dict[str, Tensor]:
    """The TIES-merged state dict ``theta_0 + lam * merged``, in the inputs' dtypes.

    Three streaming passes over the keys: the high and low halves of each task's exact
    whole-model trim threshold, then trim/elect/merge. No flattened model is ever built.
    """
    tasks = spec.tasks
    keys = spec.float_keys
    d = sum(torch.Size(spec.shapes[key]).numel() for key in keys)
    rank = trim_rank(d, k)
    thresholds: dict[str, float | None] = {t: None for t in tasks}
    if rank > 0:
        selectors = {t: StreamingKthSmallest(rank) for t in tasks}
        for key in iter_keys(keys, f"{desc}: thresholds 1/2", progress):
            for t, tau in zip(tasks, task_vectors(pretrained, finetuned, tasks, key)):
                selectors[t].add_high(tau.abs())
        for sel in selectors.values():
            sel.choose_bin()
        for key in iter_keys(keys, f"{desc}: thresholds 2/2", progress):
            for t, tau in zip(tasks, task_vectors(pretrained, finetuned, tasks, key)):
                selectors[t].add_low(tau.abs())
        thresholds = {t: sel.value() for t, sel in selectors.items()}

    merged: dict[str, Tensor] = {}
    undecided: list[tuple[str, Tensor, Tensor]] = []
    sign_total = 0
    float_keys = set(keys)
    for key in iter_keys(list(pretrained.keys()), f"{desc}: merge", progress):
        p = pretrained[key]
        if key not in float_keys:
            merged[key] = p
            continue
        taus = task_vectors(pretrained, finetuned, tasks, key)
        trimmed = torch.stack([tau if thresholds[t] is None else tau * (tau.abs() >= thresholds[t])
                               for t, tau in zip(tasks, taus)])
        delta, sign = elect_and_merge(trimmed, merge)
        sign_total += int(sign.sum())
        open_ = ((sign == 0) & (trimmed != 0).any(dim=0)).reshape(-1)
        if bool(open_.any()):
            positions = torch.nonzero(open_).reshape(-1)
            undecided.append((key, positions, trimmed.reshape(len(tasks), -1)[:, positions]))
        merged[key] = cast_like(to_float32(p) + lam * delta, p.dtype)

    majority = (sign_total > 0) - (sign_total < 0)
    for key, positions, columns in undecided:
        p = to_float32(pretrained[key]).reshape(-1)[positions]
        value = p + lam * settle_undecided(columns, majority, merge)
        flat = merged[key].reshape(-1)
        flat[positions] = cast_like(value, flat.dtype)
    return merged


@dataclass(frozen=True)
class Ties(MergeMethod):
    """TIES: trim each task to its top k% over the whole model, elect signs, disjoint merge.

    Defaults are the 8-task benchmark convention: k = 20, disjoint ``sum``, lam = 0.3; language
    suites set ``merge_function="mean"``. Where the elected sign is 0 the whole model's majority
    sign is used, as the authors' code does; if that is 0 too, those entries merge to 0
    [decision: the authors' code would keep the negative entries there].
    """

    name = "ties"
    k: float = hp(20.0, "percent of each task vector's entries kept (whole model)")
    merge_function: Literal["sum", "mean"] = hp("sum", "disjoint merge: 'sum' or 'mean'")
    lam: float = hp(0.3, "scaling coefficient of the merged task vector")

    def check(self):
        require(0 < self.k <= 100, self.name, "k", f"must be in (0, 100], got {self.k}")
        require(self.merge_function in ("sum", "mean"), self.name, "merge_function",
                "must be 'sum' or 'mean'")
        require(self.lam >= 0, self.name, "lam", f"must be >= 0, got {self.lam}")

    def merge(self, pretrained, finetuned, *, progress=False):
        spec = inspect_models(pretrained, finetuned)
        base = ties_merge(pretrained, finetuned, spec, k=self.k, merge=self.merge_function,
                          lam=self.lam, progress=progress, desc=self.name)
        return MergeResult(self.name, self.params(), base, spec.tasks,
                           merged_params=spec.merged_params)

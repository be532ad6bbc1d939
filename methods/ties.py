"""TIES-Merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving interference when merging
models"), as the authors' code and the 8-task benchmark run it."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy
import torch
from torch import Tensor

from harness.core.select import StreamingKthSmallest
from harness.core.spec import ModelSpec
from harness.core.tensors import (BlockBuffers, StateDict, cast_like, row_chunks, store_rows,
                                  task_vector)
from harness.engine.deferred import DeferredEntries
from harness.engine.method import MergeMethod, hp, require
from harness.engine.outputs import building, finish_output
from harness.engine.passes import inspect_models
from harness.engine.result import MergeResult
from harness.engine.workers import BlockWorkers
from harness.io.pages import MAPPED_PAGES, iter_keys


def trim_rank(d: int, k: float) -> int:
    """The 1-indexed rank of the trim threshold among ``d`` magnitudes: ``d - int(d * k/100)``."""
    return d - int(d * (k / 100))


def trim_below(tau: Tensor, cut: float) -> Tensor:
    """Zero, in place, the entries of the float32 ``tau`` whose magnitude is below ``cut``.

    ``hardshrink`` zeroes magnitudes up to its bound inclusive; the bound is the largest float32
    below ``cut``, so entries equal to ``cut`` are kept. One pass, where a mask takes four.
    """
    bound = torch.nextafter(torch.tensor(cut, dtype=torch.float32),
                            torch.tensor(-math.inf, dtype=torch.float32))
    return torch.ops.aten.hardshrink.out(tau, float(bound), out=tau)


def disjoint_aggregate(trimmed: Tensor, sign: Tensor, merge: str,
                       buffers: BlockBuffers | None = None) -> Tensor:
    """Sum, or mean over their count (at least 1), of the stacked entries ``(N, ...)`` whose
    sign agrees with ``sign`` (0 where ``sign`` is 0). Overwrites ``trimmed``; the result is a
    new tensor, or scratch from ``buffers``.

    Computed as ``sign * sum clamp(trimmed * sign, 0)``: negation commutes with rounding, so this
    equals the sum of the agreeing entries bit for bit, in fewer passes.
    """
    buffers = BlockBuffers() if buffers is None else buffers
    aligned = trimmed.mul_(sign).clamp_(min=0)
    total = torch.sum(aligned, dim=0, out=buffers.view("total", sign)).mul_(sign)
    if merge == "sum":
        return total
    count = torch.sum(aligned.sign_(), dim=0, out=buffers.view("count", sign))  # agreeing, exact
    return total.div_(count.clamp_(min=1))


def settle_undecided(columns: Tensor, majority: int, merge: str) -> Tensor:
    """Merge entries whose elected sign is 0 with the model's majority sign (0 -> merge to 0).
    Overwrites ``columns``."""
    sign = torch.full(columns.shape[1:], float(majority), device=columns.device)
    return disjoint_aggregate(columns, sign, merge)


class TrimThresholds:
    """Each task's exact whole-model trim threshold, gathered while the inputs stream by.

    Pass 1 is :meth:`observe`, meant as the ``observe`` hook of
    :func:`harness.state_dict.inspect_models`, so it costs no extra read of the inputs.
    """

    def __init__(self) -> None:
        self.selectors: dict[str, StreamingKthSmallest] = {}
        self._scratch = threading.local()       # blocks are observed on several threads

    def observe(self, task: str, key: str, tau: Tensor) -> tuple[int, int]:
        """Count ``tau``'s magnitudes (which overwrites it: inspect_models hands over scratch);
        returns its numbers of non-zero and non-finite entries, read off the counts."""
        buffers = getattr(self._scratch, "buffers", None)
        if buffers is None:
            buffers = self._scratch.buffers = BlockBuffers()
        selector = self.selectors.get(task) or self.selectors.setdefault(
            task, StreamingKthSmallest())
        zeros, nonfinite = selector.add_high(
            tau.abs_(), overwrite=True, scratch=buffers.view("high", tau, torch.int32).reshape(-1))
        return tau.numel() - zeros, nonfinite

    def finish(self, pretrained: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
               k: float, progress: bool, desc: str) -> dict[str, float | None]:
        """Pass 2 over the inputs, for the tasks whose threshold pass 1 left inside a bin; None
        for a task means keep everything (k = 100)."""
        self._scratch = threading.local()  # pass 1 is over: its scratch can go
        d = sum(torch.Size(spec.shapes[key]).numel() for key in spec.float_keys)
        rank = trim_rank(d, k)
        for task in spec.tasks:
            self.selectors.setdefault(task, StreamingKthSmallest())
        if rank == 0:
            return {t: None for t in spec.tasks}
        for sel in self.selectors.values():
            sel.choose_bin(rank)
        pending = [t for t in spec.tasks if self.selectors[t].needs_low]
        if pending:
            self._second_pass(pretrained, finetuned, spec, pending, progress, desc)
        return {t: self.selectors[t].value() for t in spec.tasks}

    def _second_pass(self, pretrained, finetuned, spec, pending, progress, desc):
        def count_block(p, sources, rows, mapped, *, buffers):
            p_rows = buffers.float32("theta0", p[rows])
            magnitude = buffers.view("magnitude", p_rows)
            scratch = (buffers.view("shifted", p_rows, torch.int32).reshape(-1),
                       buffers.view("in_bin", p_rows, torch.bool).reshape(-1))
            for t, source in zip(pending, sources):
                task_vector(p_rows, source[rows], out=magnitude).abs_()
                self.selectors[t].add_low(magnitude, scratch)
            MAPPED_PAGES.release_views([t[rows] for t in mapped])

        with BlockWorkers(parallel=True) as workers:     # counts: any block order
            for key in iter_keys(spec.float_keys, f"{desc}: thresholds", progress):
                p, sources = pretrained[key], [finetuned[t][key] for t in pending]
                mapped = MAPPED_PAGES.mapped(p, *sources)
                for rows in row_chunks(spec.shapes[key], 2):
                    workers.run(count_block, p, sources, rows, mapped)
            workers.wait()


def inspect_for_ties(pretrained: StateDict, finetuned: Mapping[str, StateDict]
                     ) -> tuple[ModelSpec, TrimThresholds]:
    """Validate the models and gather TIES's first threshold pass in the same read."""
    thresholds = TrimThresholds()
    spec = inspect_models(pretrained, finetuned, observe=thresholds.observe)
    return spec, thresholds


def ties_merge(pretrained: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
               thresholds: TrimThresholds, *, k: float = 20.0, merge: str = "sum",
               lam: float = 0.3, progress: bool = False, desc: str = "ties"
               ) -> dict[str, Tensor]:
    """The TIES-merged state dict ``theta_0 + lam * merged``, in the inputs' dtypes.

    Streams over the keys twice after validation (the second half of each task's exact
    whole-model trim threshold, then trim/elect/merge); no flattened model is ever built.
    """
    cut = thresholds.finish(pretrained, finetuned, spec, k, progress, desc)
    with building("merged") as merged:
        return _ties_keys(pretrained, finetuned, spec, cut, lam, merge, merged, desc, progress)


def _ties_keys(pretrained, finetuned, spec, cut, lam, merge, merged, desc, progress):
    """Trim, elect and merge key by key into ``merged``.

    Entries whose elected sign is 0 while some task kept a value take the model-wide majority
    sign, known only once every key is seen. Each key is written at once with those entries
    merged under the majority sign of the keys so far (this key included; at theta_0 while
    that is 0), usually the final one. Its undecided entries wait as their positions and their
    two possible merged values (one per majority sign, in the output dtype) in the engine's
    :class:`~harness.engine.deferred.DeferredEntries` (held in memory, then spilled), and the
    keys written under another sign than the final majority are patched at the end (in a
    shard file already written, when streaming): touching nearly every page of a key, so worth
    avoiding.
    """
    running = 0
    float_keys = set(spec.float_keys)

    def write(key, merged_key):
        nonlocal running
        value, signs, undecided = merged_key
        running += signs
        deferred.write(key, value, undecided, _outcome(running))

    with DeferredEntries(merged) as deferred, BlockWorkers(parallel=True) as workers:
        for key in iter_keys(list(pretrained.keys()), f"{desc}: merge", progress):
            p = pretrained[key]
            if key not in float_keys:
                workers.then(functools.partial(merged.__setitem__, key, p))
                continue
            sources = [finetuned[t][key] for t in spec.tasks]   # read here, merged on a worker
            mapped = MAPPED_PAGES.mapped(p, *sources)
            workers.run(_merge_key, p, sources, mapped, spec, key, cut, lam, merge,
                        then=functools.partial(write, key))
        workers.wait()
        deferred.resolve(_outcome(running),
                         lambda key, positions: _at_theta0(pretrained[key], positions),
                         f"{desc}: undecided entries", progress)
    if not isinstance(merged, dict):
        return finish_output(merged)
    return {key: merged[key] for key in pretrained.keys()}    # the inputs' key order


def _outcome(total: int) -> int | None:
    """The candidate row of a majority sign: 0 negative, 1 positive, None when there is none
    (undecided entries then merge to theta_0)."""
    return None if total == 0 else int(total > 0)


def _at_theta0(theta0: Tensor, positions: Tensor) -> Tensor:
    """theta_0's values at flat ``positions``: undecided entries merge to them (a zero delta)
    when there is no majority sign."""
    return theta0.reshape(-1)[positions.long()]


def _merge_key(p, sources, mapped, spec, key, cut, lam, merge, *, buffers):
    """One key's merged tensor (undecided entries left at theta_0), the sum of its elected
    signs, and its undecided entries or None: their flat positions (int32 where they fit) and
    their merged values under a negative and a positive majority sign, ``(2, n)`` in the key's
    dtype. ``p`` and ``sources`` are the pretrained and the tasks' tensors of ``key``; the
    pages of those in ``mapped`` are handed back block by block. Nothing is carried from key
    to key, so keys may run on several threads; blocks are computed in ``buffers``."""
    tasks = spec.tasks
    value = torch.empty(spec.shapes[key], dtype=p.dtype, device="cpu")
    positions, candidates, offset, sign_total = [], [], 0, 0
    index_dtype = torch.int32 if p.numel() < 2**31 else torch.int64
    for rows in row_chunks(spec.shapes[key], len(tasks)):
        p_rows = buffers.float32("theta0", p[rows])
        trimmed = buffers.view("trimmed", p_rows, count=len(tasks))
        # comparisons into float32 run several times faster than into bool on the CPU
        kept, scratch = buffers.view("kept", p_rows), buffers.view("scratch", p_rows)
        for row, (t, source) in enumerate(zip(tasks, sources)):
            tau = task_vector(p_rows, source[rows], out=trimmed[row])
            if cut[t] is not None:
                trim_below(tau, cut[t])
            if row:
                kept.add_(torch.ne(tau, 0, out=scratch))      # tasks keeping each entry
            else:
                torch.ne(tau, 0, out=kept)
        sign = torch.sum(trimmed, dim=0, out=buffers.view("sign", p_rows)).sign_()    # elect
        sign_total += int(sign.sum())
        undecided = torch.eq(sign, 0, out=scratch).mul_(kept)
        open_ = flat_nonzero(undecided, buffers)
        if open_.numel():
            positions.append((open_ + offset).to(index_dtype).cpu())
            # index_select: indexing a 2-D tensor as [:, open_] is far slower on the CPU
            columns = torch.index_select(trimmed.reshape(len(tasks), -1), 1, open_)
            candidates.append(_candidates(p_rows.reshape(-1)[open_], columns, lam, merge,
                                          p.dtype).cpu())
        delta = disjoint_aggregate(trimmed, sign, merge, buffers)
        store_rows(value, rows, delta.mul_(lam).add_(p_rows))
        offset += p_rows.numel()
        MAPPED_PAGES.release_views([t[rows] for t in mapped])
    if not positions:
        return value, sign_total, None
    return value, sign_total, (torch.cat(positions), torch.cat(candidates, dim=1))


def flat_nonzero(values: Tensor, buffers: BlockBuffers) -> Tensor:
    """Flat positions (int64) of the non-zero entries of ``values``; on the CPU through a bool
    copy and numpy, several times faster than ``torch.nonzero``."""
    if values.device.type != "cpu":
        return torch.nonzero(values.reshape(-1)).reshape(-1)
    mask = buffers.view("mask", values, torch.bool).copy_(values)
    return torch.from_numpy(numpy.flatnonzero(mask.numpy()))


def _candidates(theta0: Tensor, columns: Tensor, lam: float, merge: str,
                dtype: torch.dtype) -> Tensor:
    """Undecided entries' merged values ``theta0 + lam * merged`` under a negative (row 0) and
    a positive (row 1) majority sign, in ``dtype``; ``columns`` (the tasks' trimmed values
    there) is overwritten."""
    return torch.stack([cast_like(theta0 + lam * settle_undecided(work, majority, merge), dtype)
                        for work, majority in ((columns.clone(), -1), (columns, 1))])


@dataclass(frozen=True)
class Ties(MergeMethod):
    """TIES: trim each task to its top k% over the whole model, elect signs, disjoint merge.

    Defaults are the 8-task benchmark convention: k = 20, disjoint ``sum``, lam = 0.3; language
    suites set ``merge_function="mean"``. Where the elected sign is 0 the whole model's majority
    sign is used, as the authors' code does; if that is 0 too, those entries merge to 0
    [decision: the authors' code would keep the negative entries there].
    """

    name = "ties"
    display_name = "Ties-Merging"
    family = "task vectors"
    year = 2023
    k: float = hp(20.0, "percent of each task vector's entries kept (whole model)")
    merge_function: Literal["sum", "mean"] = hp("sum", "disjoint merge: 'sum' or 'mean'")
    lam: float = hp(0.3, "scaling coefficient of the merged task vector")

    def check(self):
        require(0 < self.k <= 100, self.name, "k", f"must be in (0, 100], got {self.k}")
        require(self.merge_function in ("sum", "mean"), self.name, "merge_function",
                "must be 'sum' or 'mean'")
        require(self.lam >= 0, self.name, "lam", f"must be >= 0, got {self.lam}")

    def merge(self, pretrained, finetuned, *, progress=False):
        spec, thresholds = inspect_for_ties(pretrained, finetuned)
        base = ties_merge(pretrained, finetuned, spec, thresholds, k=self.k,
                          merge=self.merge_function, lam=self.lam, progress=progress,
                          desc=self.name)
        return MergeResult(self.name, self.params(), base, spec.tasks,
                           merged_params=spec.merged_params)

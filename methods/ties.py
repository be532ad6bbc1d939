"""TIES-Merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving interference when merging
models"), as the authors' code and the 8-task benchmark run it."""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy
import torch
from torch import Tensor

from harness.method import MergeMethod, hp, require
from harness.result import MergeResult
from harness.select import NON_FINITE_HALF_BIN, StreamingKthSmallest
from harness.sharded import building, finish_output, patch_tensor
from harness.state_dict import (BlockBuffers, ModelSpec, StateDict, cast_like, inspect_models,
                                iter_keys, row_blocks, task_vector)


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
    :func:`harness.state_dict.inspect_models`, so it costs no extra read of the inputs. Where
    pass 1 leaves a threshold inside a bin (float32 task vectors, usually), the merge itself
    counts the bin's low bits (:func:`_merge_key`): no other read either.
    """

    def __init__(self) -> None:
        self.selectors: dict[str, StreamingKthSmallest] = {}
        self.buffers = BlockBuffers()

    def observe(self, task: str, key: str, tau: Tensor) -> tuple[int, int]:
        """Count ``tau``'s magnitudes (which overwrites it: inspect_models hands over scratch);
        returns its numbers of non-zero and non-finite entries, read off the counts."""
        selector = self.selectors.get(task)
        if selector is None:                # not setdefault: that would build one every call
            selector = self.selectors[task] = StreamingKthSmallest()
        counts = selector.add_high(
            tau.abs_(), overwrite=True,
            scratch=self.buffers.view("high", tau, torch.int32).reshape(-1))
        return tau.numel() - int(counts[0]), int(counts[NON_FINITE_HALF_BIN:].sum())

    def finish(self, spec: ModelSpec, k: float
               ) -> tuple[dict[str, float | None], dict[str, StreamingKthSmallest]]:
        """Each task's cut as far as pass 1 knows it (None: keep everything, k = 100), and the
        selectors of the tasks whose threshold lies inside a bin: their cut is the bin's lower
        edge until the merge has counted the entries inside it."""
        self.buffers = None                 # pass 1 is over: its scratch can go
        d = sum(torch.Size(spec.shapes[key]).numel() for key in spec.float_keys)
        rank = trim_rank(d, k)
        if rank == 0:
            return {t: None for t in spec.tasks}, {}
        for sel in self.selectors.values():
            sel.choose_bin(rank)
        pending = {t: self.selectors[t] for t in spec.tasks if self.selectors[t].needs_low}
        cut = {t: sel.lower_edge if t in pending else sel.value()
               for t, sel in ((t, self.selectors[t]) for t in spec.tasks)}
        return cut, pending


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

    Streams over the keys once after validation (trim/elect/merge), which also completes the
    thresholds that validation left inside a bin; no flattened model is ever built.
    """
    cut, pending = thresholds.finish(spec, k)
    with building("merged") as merged:
        return _ties_keys(pretrained, finetuned, spec, cut, pending, lam, merge, merged, desc,
                          progress)


HELD_BYTES = 2**29    # entries held back until the end of the merge, kept in memory


class HeldEntries:
    """Entries held back key by key until every key is merged (undecided entries waiting for
    the majority sign, columns waiting for exact thresholds), each as a tuple of tensors under
    a name: in memory up to ``HELD_BYTES`` in all, then spilled to safetensors files in
    ``folder`` (a temporary folder)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.held: dict[tuple[str, str], tuple[Tensor, ...]] = {}
        self.spilled: dict[tuple[str, str], str] = {}
        self.held_bytes = 0
        self._files = itertools.count()

    def add(self, name: tuple[str, str], *entries: Tensor) -> None:
        size = sum(t.numel() * t.element_size() for t in entries)
        if self.held_bytes + size <= HELD_BYTES:
            self.held[name] = entries
            self.held_bytes += size
        else:
            self._spill(name, *entries)

    def _spill(self, name: tuple[str, str], *entries: Tensor) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.folder, f"{next(self._files):06d}.safetensors")
        save_file({str(i): t for i, t in enumerate(entries)}, path)
        self.spilled[name] = path

    def keys(self, kind: str) -> list[str]:
        """The keys holding entries of ``kind``."""
        return [key for k, key in [*self.held, *self.spilled] if k == kind]

    def get(self, name: tuple[str, str]) -> tuple[Tensor, ...]:
        """The entries under ``name``, kept for a later :meth:`take`."""
        from safetensors.torch import load_file

        if name in self.held:
            return self.held[name]
        loaded = load_file(self.spilled[name])
        return tuple(loaded[str(i)] for i in range(len(loaded)))

    def take(self, name: tuple[str, str]) -> tuple[Tensor, ...]:
        """The entries under ``name``, given up once taken."""
        entries = self.get(name)
        if name in self.held:
            del self.held[name]
        else:
            os.remove(self.spilled.pop(name))
        return entries


def _ties_keys(pretrained, finetuned, spec, cut, pending, lam, merge, merged, desc, progress):
    """Trim, elect and merge key by key into ``merged``.

    Entries whose elected sign is 0 while some task kept a value take the model-wide majority
    sign, known only once every key is seen. Each key is written at once with those entries
    merged under the majority sign of the keys so far (this key included; at theta_0 while
    that is 0), usually the final one (for all but a few keys of the synthesized bf16 0.5B
    set in ``scripts/bench_scale.py``). Its undecided entries wait as their
    positions and their two possible merged values (one per majority sign, in the output
    dtype): in memory up to ``HELD_BYTES``, then in a temporary folder (beside the output when
    it is streamed), so memory stays bounded whatever the model size (bf16 task vectors cancel
    exactly often enough that nearly every key of a large model holds some). The keys written
    under another sign than the final majority are then patched in place (in a shard file
    already written, when streaming): touching nearly every page of a key, so worth avoiding.

    For the ``pending`` tasks, whose threshold validation left inside a bin (float32 task
    vectors), the merge counts the low bits of the entries inside it, so their thresholds are
    exact at the end; the columns where such an entry may or may not be trimmed (about one in a
    hundred with 8 tasks) wait the same way, as their positions, theta_0 and the tasks' values,
    and are merged and patched once the thresholds and the majority are known.
    """
    running = 0
    guesses: dict[str, int] = {}
    buffers = BlockBuffers()
    float_keys = set(spec.float_keys)
    streamed_to = getattr(merged, "directory", None)       # a ShardWriter's output folder
    beside = os.path.dirname(os.path.abspath(streamed_to)) if streamed_to else None
    with tempfile.TemporaryDirectory(prefix=".ties-undecided-", dir=beside) as folder:
        waiting = HeldEntries(folder)
        for key in iter_keys(list(pretrained.keys()), f"{desc}: merge", progress):
            if key not in float_keys:
                merged[key] = pretrained[key]
                continue
            value, signs, undecided, columns = _merge_key(pretrained, finetuned, spec, key, cut,
                                                          pending, lam, merge, buffers)
            running += signs
            if undecided is not None:
                guess = guesses[key] = _sign(running)
                if guess:
                    positions, candidates = undecided
                    patch_tensor(value, positions, candidates[(guess + 1) // 2])
                waiting.add(("undecided", key), *undecided)
            if columns is not None:
                waiting.add(("columns", key), *columns)
            merged[key] = value
            del value, undecided    # a key already written to a shard must not outlive its turn
        for task, selector in pending.items():
            cut[task] = selector.value()            # exact: the merge counted its low bits
        rows = [row for row, task in enumerate(spec.tasks) if task in pending]
        held_back = waiting.keys("columns")
        for key in held_back:
            _, _, columns = waiting.get(("columns", key))
            running += int(_elect(columns, rows, spec.tasks, cut).sum())
        majority = _sign(running)
        wrong = [key for key in waiting.keys("undecided") if guesses[key] != majority]
        for key in iter_keys(wrong, f"{desc}: undecided entries", progress):
            positions, candidates = waiting.take(("undecided", key))
            merged.patch(key, positions, candidates[(majority + 1) // 2] if majority else
                         _at_theta0(pretrained[key], positions))
        for key in iter_keys(held_back, f"{desc}: entries at the thresholds", progress):
            positions, theta0, columns = waiting.take(("columns", key))
            sign = _elect(columns, rows, spec.tasks, cut)
            if majority:        # undecided: a kept entry but no elected sign
                sign[(sign == 0) & columns.ne(0).any(dim=0)] = majority
            delta = disjoint_aggregate(columns, sign, merge)
            merged.patch(key, positions, cast_like(delta.mul_(lam).add_(theta0),
                                                   pretrained[key].dtype))
    if not isinstance(merged, dict):
        return finish_output(merged)
    return {key: merged[key] for key in pretrained.keys()}    # the inputs' key order


def _elect(columns: Tensor, rows: list[int], tasks: list[str], cut) -> Tensor:
    """The elected signs of held-back columns ``(N, n)``, once the ``rows`` of the pending
    tasks are trimmed (in place) at their exact cuts."""
    for row in rows:
        trim_below(columns[row], cut[tasks[row]])
    return torch.sum(columns, dim=0).sign_()


def _sign(total: int) -> int:
    return (total > 0) - (total < 0)


def _at_theta0(theta0: Tensor, positions: Tensor) -> Tensor:
    """theta_0's values at flat ``positions``: undecided entries merge to them (a zero delta)
    when there is no majority sign."""
    return theta0.reshape(-1)[positions.long()]


def _merge_key(pretrained, finetuned, spec, key, cut, pending, lam, merge, buffers):
    """One key's merged tensor (undecided and held-back entries left at theta_0), the sum of
    its elected signs (held-back columns left out), its undecided entries or None, and its
    held-back columns or None. Undecided entries: their flat positions (int32 where they fit)
    and their merged values under a negative and a positive majority sign, ``(2, n)`` in the
    key's dtype. Held-back columns, where a ``pending`` task's entry lies inside its
    threshold's bin: their positions, theta_0 there and the tasks' values there, trimmed but
    for those entries (float32, ``(N, n)``). Blocks are computed in ``buffers``."""
    tasks = spec.tasks
    p = pretrained[key]
    sources = [finetuned[t][key] for t in tasks]
    value = torch.empty(spec.shapes[key], dtype=p.dtype, device="cpu")
    positions, candidates, offset, sign_total = [], [], 0, 0
    held: list[tuple[Tensor, Tensor, Tensor]] = []
    index_dtype = torch.int32 if p.numel() < 2**31 else torch.int64
    # each task's bin as the bits of its entries inside it show, sign and low bits masked off
    # (-1, which no entry shows, for a task not pending)
    bins = [pending[t].bin << 16 if t in pending else -1 for t in tasks]
    for rows in row_blocks(spec.shapes[key], len(tasks)):
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
        if pending:     # columns with an entry inside a pending bin: held back
            high = torch.bitwise_and(trimmed.view(torch.int32), 0x7FFF0000,
                                     out=buffers.view("high", trimmed, torch.int32))
            in_bin = torch.eq(high, torch.tensor(bins, dtype=torch.int32, device=p_rows.device)
                              .view(-1, *[1] * p_rows.dim()),
                              out=buffers.view("in_bin", trimmed, torch.bool))
            hold = flat_nonzero(torch.any(in_bin, dim=0,
                                          out=buffers.view("at_cut", p_rows, torch.bool)),
                                buffers)
            if hold.numel():
                columns = torch.index_select(trimmed.reshape(len(tasks), -1), 1, hold)
                for row, t in enumerate(tasks):
                    if t in pending:
                        pending[t].add_low(columns[row])        # the bin's low bits
                held.append(((hold + offset).to(index_dtype).cpu(),
                                  p_rows.reshape(-1)[hold].cpu(), columns.cpu()))
                sign.view(-1).index_fill_(0, hold, 0)       # merged later: neither elected
                kept.view(-1).index_fill_(0, hold, 0)       # nor undecided here
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
        value[rows].copy_(delta.mul_(lam).add_(p_rows))    # cast to the inputs' dtype
        offset += p_rows.numel()
    undecided = (torch.cat(positions), torch.cat(candidates, dim=1)) if positions else None
    held_back = tuple(torch.cat(parts, dim=-1) for parts in zip(*held)) if held else None
    return value, sign_total, undecided, held_back


def flat_nonzero(values: Tensor, buffers: BlockBuffers) -> Tensor:
    """Flat positions (int64) of the non-zero entries of ``values``; on the CPU through a bool
    copy and numpy, several times faster than ``torch.nonzero``."""
    if values.device.type != "cpu":
        return torch.nonzero(values.reshape(-1)).reshape(-1)
    mask = values if values.dtype == torch.bool else \
        buffers.view("mask", values, torch.bool).copy_(values)
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

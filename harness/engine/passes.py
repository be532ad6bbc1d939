"""The passes over the inputs that merges are made of, one key (or row block) at a time.

:func:`inspect_models` validates the models (structure, then values in one read unless the
merge pass checks them itself); :func:`merge_shared` builds one merged model from a per-block
rule; :func:`shared_and_masks` runs a masking rule on one key; :func:`encode_deltas` encodes each
task's delta against a reference, key by key. Every pass runs the value checks of
:class:`~harness.core.spec.ValueChecks` on the blocks it computes anyway, hands back the pages
it read after each key (:mod:`harness.io.pages`), and writes into the output container the
engine chose (:mod:`harness.engine.outputs`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core.bits import BitPacker
from harness.core.errors import MergeInputError
from harness.core.fused import fits
from harness.core.spec import (ModelSpec, ValueChecks, check_keys, describe_key,
                               describe_models)
from harness.core.tensors import (BlockBuffers, StateDict, current_device, numel, row_chunks,
                                  store_rows, surely_finite, task_vector, to_float32)
from harness.engine.outputs import building, finish_output
from harness.engine.workers import BlockWorkers
from harness.io.pages import MAPPED_PAGES, iter_keys, row_blocks


def inspect_models(pretrained: StateDict, finetuned: Mapping[str, StateDict],
                   *, allow_zero_tasks: bool = False, observe=None,
                   values: bool = True) -> ModelSpec:
    """Validate models before any merging work and describe them, in one pass over every value
    (:func:`~harness.core.spec.describe_key` and :class:`~harness.core.spec.ValueChecks` per
    key); with ``values=False`` only the structure (no value read), leaving the value checks
    to the merge pass.

    ``observe(task, key, delta)``, when given, sees each float32 task vector as it is computed
    (in row blocks of large keys, so memory stays bounded), so a method can gather whole-model
    statistics without another pass over the inputs. ``delta`` is scratch, reused for the next
    block: valid during the call only, and the hook may overwrite it. A hook that sees every
    value anyway (a histogram) may return ``delta``'s numbers of non-zero and of non-finite
    entries, which validation then does not count again. Blocks are checked on several threads
    at once (:class:`~harness.engine.workers.BlockWorkers`), so the hook must be safe to call
    from them and must not depend on the order of the blocks.

    Raises :class:`MergeInputError` on an empty task set, a missing or extra key, a shape
    mismatch, a non-float tensor where a float is required, NaN/Inf values, a task vector that
    overflows float32, or a task whose task vector is identically zero (almost always the
    pretrained model passed by mistake).
    """
    if not values:
        return describe_models(pretrained, finetuned)
    spec = check_keys(pretrained, finetuned)
    checks = ValueChecks(spec, allow_zero_tasks)

    def validate_block(key, p, sources, rows, mapped, *, buffers):
        p32 = buffers.float32("theta0", p[rows])       # a block of theta_0 and of one delta
        checks.pretrained(key, p32)
        delta = buffers.view("delta", p32)
        for task, t in zip(spec.tasks, sources):
            block = t[rows]
            task_vector(p32, block, out=delta)   # NaN/Inf in t shows too
            counted = observe(task, key, delta) if observe is not None else None
            checks.task(task, key, delta, block, counted)
        MAPPED_PAGES.release_views([t[rows] for t in mapped])

    with BlockWorkers(parallel=True) as workers:
        for key in iter_keys(list(pretrained.keys()), "validate", False):
            p = pretrained[key]
            sources = [finetuned[task][key] for task in spec.tasks]
            if not describe_key(spec, key, p, sources):
                continue
            mapped = MAPPED_PAGES.mapped(p, *sources)
            for rows in row_chunks(spec.shapes[key], 2):
                workers.run(validate_block, key, p, sources, rows, mapped)
        workers.wait()
    checks.finish()
    return spec


def task_vector_blocks(pretrained: StateDict, finetuned: Mapping[str, StateDict],
                       spec: ModelSpec, key: str, *, weights: bool = False,
                       checks: ValueChecks | None = None, whole: bool = False,
                       fused: bool = False) -> Iterator[tuple]:
    """``(rows, theta_0 block, the tasks' task-vector blocks)`` of one key in row blocks, float32
    on the merge device, for rules that are elementwise across tasks (``whole``: the key as one
    block, ``rows`` then ``...``); with ``weights``, the tasks' own weights (float32, possibly
    views of the inputs) instead of their task vectors. With ``checks``, every block is checked
    (:class:`ValueChecks`) before it is handed over.

    With ``checks``, each task is only marked changed or not per key
    (:meth:`ValueChecks.mark_changed`), never counted entry by entry: these passes' merges need
    no more. With ``fused`` too, the tasks' values are not checked here: the caller checks the
    output instead, which shows every non-finite input of a rule that propagates them, and
    runs :func:`check_block` to name the culprit when it is not finite.

    Task vectors (and weight casts) are computed into :class:`BlockBuffers`, reused for the next
    block: use each block's before asking for the next.
    """
    p, sources = pretrained[key], [finetuned[t][key] for t in spec.tasks]
    buffers = BlockBuffers()
    for rows in [...] if whole else row_blocks(spec.shapes[key], len(sources)):
        yield (rows, *block_inputs(spec, key, p, sources, rows, buffers, weights=weights,
                                   checks=checks, fused=fused))


def block_inputs(spec: ModelSpec, key: str, p: Tensor, sources: list[Tensor], rows,
                 buffers: BlockBuffers, *, weights: bool = False,
                 checks: ValueChecks | None = None, fused: bool = False
                 ) -> tuple[Tensor, list[Tensor]]:
    """``(theta_0 block, the tasks' task-vector blocks)`` of one row block of ``key``, from the
    pretrained tensor ``p`` and the tasks' tensors ``sources``, into ``buffers``: one step of
    :func:`task_vector_blocks` (whose docstring says what ``weights``, ``checks`` and
    ``fused`` do)."""
    theta0 = buffers.float32("theta0", p[rows])
    if checks is not None and not (fused and not weights):    # fused: theta_0 is in the
        checks.pretrained(key, theta0)                         # output of a fused rule
    blocks = [source[rows] for source in sources]
    if checks is not None:                  # changed or not is all these passes need
        reference = p[rows]
        for task, block in zip(spec.tasks, blocks):
            checks.mark_changed(task, key, block, reference)
    if weights:
        inputs = [buffers.float32(f"weights{row}", block) for row, block in enumerate(blocks)]
        if checks is not None and not fused:
            delta = buffers.view("delta", theta0)
            for task, weight, block in zip(spec.tasks, inputs, blocks):
                torch.sub(weight, theta0, out=delta)
                checks.task(task, key, delta, block, (0, not_finite(delta)),
                            overflow_ok=True)
        return theta0, inputs
    taus = list(buffers.view("taus", theta0, count=len(sources)))
    for task, tau, block in zip(spec.tasks, taus, blocks):
        task_vector(theta0, block, out=tau)
        if checks is not None and not fused:
            checks.task(task, key, tau, block, (0, not_finite(tau)))
    return theta0, taus


def not_finite(t: Tensor) -> bool:
    """Whether ``t`` holds a NaN or Inf: one cheap reduction, the exact check only when it
    says so (a sum of finite values may overflow)."""
    return not surely_finite(t) and not bool(torch.isfinite(t).all())


def check_block(pretrained: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
                key: str, rows, checks: ValueChecks, weights: bool) -> None:
    """The exact checks of one block of every task (raising naming the task and the problem),
    for a fused pass whose output block is not finite: a non-finite input or a task vector
    that overflows. The counts of non-zero entries are not added again."""
    theta0 = to_float32(pretrained[key][rows])
    checks.pretrained(key, theta0)
    for task in spec.tasks:
        block = finetuned[task][key][rows]
        delta = task_vector(theta0, block)
        checks.task(task, key, delta, block, (0, not_finite(delta)), overflow_ok=weights)


def shared_and_masks(pretrained: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
                     key: str, rule, checks: ValueChecks | None = None
                     ) -> tuple[Tensor, list[Tensor]]:
    """One key of a masking rule, ``rule(taus) -> (shared block, the tasks' bool masks)``, that
    is elementwise across tasks (EMR, TALL-Mask), run in row blocks: the float32 shared tensor
    on the CPU and each task's mask packed at 1 bit per entry, the bits of the whole key. With
    ``checks``, the key's values are checked on the same blocks."""
    shape = spec.shapes[key]
    shared = torch.empty(shape, dtype=torch.float32, device="cpu")
    packers = [BitPacker(numel(shape), 1) for _ in spec.tasks]
    for rows, _, taus in task_vector_blocks(pretrained, finetuned, spec, key, checks=checks):
        block, masks = rule(taus)
        store_rows(shared, rows, block)
        for packer, mask in zip(packers, masks):
            packer.add(mask.cpu())
    return shared, [packer.finish() for packer in packers]


def merge_shared(pretrained: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
                 merge_key, desc: str, progress: bool, *, elementwise: bool = False,
                 weights: bool = False, propagates_nonfinite: bool = False,
                 parallel: bool = False, fused_rule=None) -> StateDict:
    """A merged state dict built key by key: ``merge_key(key, theta0_f32, taus, out)`` gives
    the float32 merged tensor of each float key (``out``: a float32 scratch block shaped like
    ``theta0_f32`` it may write into); other keys are copied from the pretrained model.
    With ``elementwise`` (the rule treats every entry on its own) large keys go through in row
    blocks, so memory stays bounded by a block rather than a whole key (the same bits); with
    ``weights``, ``merge_key`` gets the tasks' float32 weights in place of ``taus``. A float32
    output on the merge device is the rule's ``out`` itself (no copy after). A ``spec``
    whose values are not checked yet (``inspect_models(values=False)``) gets them checked on the
    blocks (or whole keys) of this pass. With ``propagates_nonfinite`` (the rule's output is
    not finite wherever an input task vector, or weight, is not: sums and products, never a
    dropped entry) those checks are fused: the output block is checked, and the inputs only
    when it is not finite (:func:`check_block`); each task is compared with the pretrained
    model until it is known to change the key. The errors are the same, at a fraction of the
    passes over memory. With ``parallel`` (``merge_key`` keeps no state between blocks and may
    run on several at once), the blocks run on :class:`~harness.engine.workers.BlockWorkers`:
    the same bits, without torch's per-operation thread meetings. A ``fused_rule``
    (:meth:`~harness.engine.templates.SharedMerge.fused_rule`, with ``propagates_nonfinite``)
    computes the blocks it takes (float32 on the CPU) in one pass over the raw inputs, counting
    each task's changed entries as it goes; the checks are those of the fused pass above.
    """
    float_keys = set(spec.float_keys)
    checks = None if spec.values_checked else ValueChecks(spec)
    fused = propagates_nonfinite and checks is not None
    if fused_rule is not None and not propagates_nonfinite:
        raise ValueError("a fused rule needs propagates_nonfinite: its checks read the output")
    on_cpu = current_device().type == "cpu"         # another merge device computes there

    def fused_block(key, p, sources, value, rows) -> bool:
        """Whether ``fused_rule`` computed this block (float32 blocks on the CPU only)."""
        if fused_rule is None or value.dtype != torch.float32 or not on_cpu:
            return False
        out, theta0, blocks = value[rows], p[rows], [source[rows] for source in sources]
        if not fits(out, theta0, *blocks):
            return False
        changed = fused_rule(out, theta0, blocks)
        if checks is not None:
            if weights:                     # a merge of the weights: theta_0 is not in it
                checks.pretrained(key, theta0)
            for task, count in zip(spec.tasks, changed):
                checks.mark_counted(task, key, count)
            if not surely_finite(out):
                check_block(pretrained, finetuned, spec, key, rows, checks, weights)
        return True

    def merge_block(key, p, sources, value, rows, mapped, *, buffers):
        if not fused_block(key, p, sources, value, rows):
            theta0, inputs = block_inputs(spec, key, p, sources, rows, buffers,
                                          weights=weights, checks=checks, fused=fused)
            direct = value.dtype == torch.float32 and value.device == theta0.device
            out = value[rows] if direct else buffers.view("merged", theta0)
            block = merge_key(key, theta0, inputs, out)
            if fused and not surely_finite(block):
                check_block(pretrained, finetuned, spec, key, rows, checks, weights)
            if not (direct and block.data_ptr() == out.data_ptr()
                    and block.shape == out.shape):
                store_rows(value, rows, block)
        MAPPED_PAGES.release_views([t[rows] for t in mapped])     # this block's input pages

    with building("merged") as merged, BlockWorkers(parallel) as workers:
        for key in iter_keys(list(pretrained.keys()), desc, progress):
            p = pretrained[key]
            if key in float_keys:
                value = torch.empty(spec.shapes[key], dtype=p.dtype, device="cpu")
                sources = [finetuned[task][key] for task in spec.tasks]
                mapped = MAPPED_PAGES.mapped(p, *sources)
                for rows in row_chunks(spec.shapes[key], len(sources)) if elementwise else [...]:
                    workers.run(merge_block, key, p, sources, value, rows, mapped)
            else:
                value = p
            workers.then(functools.partial(merged.__setitem__, key, value))  # once it is done
        workers.wait()
        if checks is not None:
            checks.finish()
        return finish_output(merged)


@dataclass(frozen=True)
class BlockedDelta:
    """The float32 delta ``source - reference`` of a tensor too large to hold whole: each call
    of :meth:`blocks` reads it again, block by block along its longer side."""

    reference: Tensor
    source: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.reference.shape)

    def blocks(self) -> Iterator[tuple[object, Tensor]]:
        """``(index, block)``: float32 blocks on the merge device; ``index`` places a block in
        the whole tensor (rows, or for a wide matrix ``(slice(None), columns)``)."""
        shape = self.shape
        wide = len(shape) == 2 and shape[0] < shape[1]
        for part in row_blocks(shape[::-1] if wide else shape, 2):
            index = (slice(None), part) if wide else part
            yield index, task_vector(self.reference[index], self.source[index])


def encode_deltas(reference: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
                  encode, desc: str, progress: bool, *, blocked=None) -> dict[str, dict]:
    """Per task, ``encode(key, delta)`` of each non-zero float32 delta against ``reference``.

    Keys no task changed are skipped (they are outside the AMR parameter set); ``encode`` may
    return None to store nothing for a key. Keys for which ``blocked(key)`` holds reach
    ``encode`` as a :class:`BlockedDelta`, never whole, and may be zero. Returns task -> key ->
    codec.
    """
    records: dict[str, dict] = {t: {} for t in spec.tasks}
    for key in iter_keys(spec.active_keys, desc, progress):
        ref = reference[key]
        for task in spec.tasks:
            try:
                if blocked is not None and blocked(key):
                    delta = BlockedDelta(ref, finetuned[task][key])
                    codec = encode(key, delta)
                else:
                    delta = task_vector(ref, finetuned[task][key])
                    if not surely_finite(delta) and not bool(torch.isfinite(delta).all()):
                        raise MergeInputError(
                            f"the delta of key {key!r} of task model {task!r} against the "
                            "method's base is not finite: the base (or the task vector) overflows "
                            "float32")
                    codec = encode(key, delta) if delta.any() else None
            except torch.linalg.LinAlgError as error:
                raise MergeInputError(f"the decomposition of key {key!r} of task model {task!r} "
                                      f"failed: {error}") from None
            if codec is not None:
                records[task][key] = codec.cpu()
            del delta, codec                 # not alive while the next task's delta is built
            MAPPED_PAGES.release(forget=False)    # nor this task's mapped input pages
    return records

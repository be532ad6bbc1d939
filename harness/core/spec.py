"""What a set of models to merge looks like, and the checks every merge runs on it.

:func:`describe_models` checks the structure (keys, shapes, float dtypes) without reading a
value; :class:`ValueChecks` checks values block by block as a pass over the inputs computes them
(NaN/Inf, a task vector that overflows float32, a task equal to the pretrained model) and counts
each task's changed entries per key, which give the AMR parameter set.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from harness.core.errors import MergeInputError
from harness.core.tensors import (BlockBuffers, StateDict, check_finite, count_nonzero, is_float,
                                  numel, surely_finite)

@dataclass
class ModelSpec:
    """What a validation pass learns about a set of models to merge."""

    tasks: list[str]
    float_keys: list[str]                       # merged keys, in pretrained order
    other_keys: list[str]                       # non-float buffers, copied from pretrained
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    # task -> key -> number of non-zero task-vector entries, exact after inspect_models; a merge
    # pass that checks the values itself (inspect_models(values=False)) records 1 for "some"
    changed: dict[str, dict[str, int]] = field(default_factory=dict)
    values_checked: bool = True     # False until a pass over the inputs has run ValueChecks

    @property
    def zero_keys(self) -> set[str]:
        """Keys whose task vector is identically zero in every task."""
        if not self.values_checked:
            raise RuntimeError("the models' values are not checked yet: the non-zero counts "
                               "are known once the merge pass that checks them has run")
        return {k for k in self.float_keys if all(self.changed[t][k] == 0 for t in self.tasks)}

    @property
    def active_keys(self) -> list[str]:
        """Merged keys that some task changed: the AMR parameter set."""
        zero = self.zero_keys
        return [k for k in self.float_keys if k not in zero]

    @property
    def merged_params(self) -> int:
        """Number of parameters in the AMR denominator (spec, Accounting)."""
        return sum(numel(self.shapes[k]) for k in self.active_keys)


class ValueChecks:
    """Validation's checks on values, run on the float32 blocks of a pass over the inputs:
    NaN/Inf in any model, each task's number of non-zero task-vector entries per key, and no
    task whose task vector is zero everywhere. :func:`inspect_models` runs them in a pass of its
    own; an elementwise merge runs them on the blocks it computes anyway
    (``inspect_models(values=False)``), which spares a whole read of the inputs."""

    def __init__(self, spec: ModelSpec, allow_zero_tasks: bool = False) -> None:
        self.spec, self.allow_zero_tasks = spec, allow_zero_tasks
        self._local = threading.local()     # blocks may be checked on several threads at once
        self._counting = threading.Lock()

    @property
    def buffers(self) -> BlockBuffers:
        """The calling thread's scratch buffers."""
        found = getattr(self._local, "buffers", None)
        if found is None:
            found = self._local.buffers = BlockBuffers()
        return found

    def pretrained(self, key: str, theta0: Tensor) -> None:
        """Check a float32 block of the pretrained model."""
        if not surely_finite(theta0):
            check_finite(theta0, key, "the pretrained model")

    def task(self, task: str, key: str, delta: Tensor, source: Tensor,
             counted: tuple[int, bool] | None = None, overflow_ok: bool = False) -> None:
        """Check a task's float32 task-vector block ``delta`` (of the block ``source`` of its
        model) and count its non-zero entries; ``counted`` gives the counts of non-zero and of
        non-finite entries when the caller has them already. A delta that overflows float32
        where both models are finite is an error, unless ``overflow_ok`` (a rule that merges
        the weights themselves, never their difference)."""
        if counted is None:
            nonzero = count_nonzero(delta, self.buffers.view("bits", delta, torch.int32))
            nonfinite = not surely_finite(delta)
        else:
            nonzero, nonfinite = counted
        if nonfinite and (counted is not None or not bool(torch.isfinite(delta).all())):
            check_finite(source, key, f"task model {task!r}")
            if not overflow_ok:
                raise MergeInputError(
                    f"the task vector of key {key!r} for task model {task!r} overflows float32: "
                    "both models are finite there, their difference is not")
        with self._counting:
            self.spec.changed[task][key] += nonzero

    def mark_changed(self, task: str, key: str, source: Tensor, pretrained: Tensor) -> None:
        """For a merge pass that checks values itself
        (:func:`~harness.engine.passes.task_vector_blocks`): note whether the task's ``source``
        block differs from the ``pretrained`` block (same dtype) as 1 non-zero entry, without
        counting them. Once a key is known changed, later blocks are not compared."""
        if self.spec.changed[task][key] == 0 and (
                not torch.equal(source.reshape(-1)[:4096], pretrained.reshape(-1)[:4096])
                or not torch.equal(source, pretrained)):       # most differ in the first
            self.mark_counted(task, key, 1)

    def mark_counted(self, task: str, key: str, changed: int) -> None:
        """For a pass that counted the ``changed`` entries of a task's block that differ from
        the pretrained block (a fused kernel): note the key changed, as 1 non-zero entry, when
        any does."""
        if changed and self.spec.changed[task][key] == 0:
            with self._counting:
                self.spec.changed[task][key] = max(self.spec.changed[task][key], 1)

    def unchanged(self, key: str) -> bool:
        """Whether every task's task vector of ``key`` (all of whose blocks are checked) is
        zero: a key outside the AMR parameter set, which masking merges do not store."""
        return all(self.spec.changed[task][key] == 0 for task in self.spec.tasks)

    def finish(self) -> None:
        """After every block: refuse a task that equals the pretrained model, and mark the
        values checked."""
        spec = self.spec
        if not self.allow_zero_tasks:
            for task in spec.tasks:
                if not any(spec.changed[task].values()):
                    raise MergeInputError(
                        f"task model {task!r} equals the pretrained model on every merged key "
                        "(its task vector is zero): was the pretrained model passed by mistake?")
        spec.values_checked = True


def check_keys(pretrained: StateDict, finetuned: Mapping[str, StateDict]) -> ModelSpec:
    """A spec with the models' tasks, after checking that every task model has exactly the
    pretrained model's keys; no tensor is read. :func:`describe_key` fills it in key by key."""
    tasks = list(finetuned)
    if not tasks:
        raise MergeInputError("no task models given: the task set is empty")
    pre_keys = list(pretrained.keys())
    pre_set = set(pre_keys)
    for task in tasks:
        keys = set(finetuned[task].keys())
        missing = [k for k in pre_keys if k not in keys]
        if missing:
            raise MergeInputError(
                f"key {missing[0]!r} is missing from task model {task!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(keys - pre_set)
        if extra:
            raise MergeInputError(
                f"key {extra[0]!r} of task model {task!r} is missing from the pretrained model"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return ModelSpec(tasks, [], [], {}, {}, {t: {} for t in tasks}, values_checked=False)


def describe_key(spec: ModelSpec, key: str, pretrained: Tensor, sources: list[Tensor]) -> bool:
    """Record ``key``'s shape and dtype in ``spec`` and check the tasks' tensors (``sources``, in
    task order) against the pretrained one; True for a float key, which merges merge."""
    spec.shapes[key] = tuple(pretrained.shape)
    spec.dtypes[key] = pretrained.dtype
    if not is_float(pretrained):
        spec.other_keys.append(key)
        return False
    spec.float_keys.append(key)
    for task, t in zip(spec.tasks, sources):
        if not is_float(t):
            raise MergeInputError(
                f"key {key!r} of task model {task!r} has dtype {t.dtype}, "
                f"where a floating-point tensor is required")
        if tuple(t.shape) != spec.shapes[key]:
            raise MergeInputError(
                f"key {key!r} has shape {tuple(t.shape)} in task model {task!r} but "
                f"{spec.shapes[key]} in the pretrained model")
        spec.changed[task][key] = 0
    return True


def describe_models(pretrained: StateDict, finetuned: Mapping[str, StateDict]) -> ModelSpec:
    """The models' structure, checked without reading a value: every task model has exactly
    the pretrained model's keys, float tensors where it has them, of the same shapes.

    Raises :class:`MergeInputError` on an empty task set, a missing or extra key, a shape
    mismatch, or a non-float tensor where a float is required. The returned spec's values are
    not checked yet (``values_checked`` is False): a pass over the inputs runs
    :class:`ValueChecks`.
    """
    spec = check_keys(pretrained, finetuned)
    for key in pretrained.keys():
        describe_key(spec, key, pretrained[key], [finetuned[t][key] for t in spec.tasks])
    return spec

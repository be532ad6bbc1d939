"""``MergeResult``: what every method returns, and the only thing suites consume.

A result is a shared base state dict plus, for personalized methods, one small payload per task
(codecs from :mod:`harness.engine.codecs`) and optional shared tensors the payloads refer to (EMR's
unified task vector, TALL's multi-task vector). ``weights_for(task)`` decodes one task at a time.
``save``/``load`` write safetensors files and a protected JSON manifest
(:mod:`harness.engine.storage`), so the round trip is bit-exact and a damaged or altered folder
is detected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from harness.core.accounting import amr_percent
from harness.core.errors import NonFiniteOutputError
from harness.core.tensors import StateDict, cast_like, to_float32
from harness.engine.codecs import TaskPayload
from harness.engine.storage import ResultFormatError, load_result, save_result

__all__ = ["MergeResult", "NonFiniteOutputError", "ResultFormatError", "TaskPayload"]


@dataclass
class MergeResult:
    """A merged model: shared base, per-task payloads, and the accounting facts about them.

    ``unseen`` says how a task outside the merged set is served by default:
    ``{"shared": name, "scale": c}`` gives ``base + c * shared[name]``, ``{}`` gives the base,
    and ``{"weighted": True}`` requires similarity weights (DTS, eq. 8).
    """

    method: str
    hyperparameters: dict
    base: StateDict
    tasks: list[str]
    kind: str = "shared"                        # "shared" | "personalized"
    payloads: dict[str, TaskPayload] = field(default_factory=dict)
    shared: dict[str, StateDict] = field(default_factory=dict)
    merged_params: int = 0                      # the AMR denominator, in parameters
    accounting: dict = field(default_factory=dict)  # a method's own counts (DTS: paper_bits)
    unseen: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)    # chosen densities, scales, warnings: JSON only

    # ---- serving -------------------------------------------------------------------------
    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not in this result; its tasks are {self.tasks}")

    def weights_for(self, task: str) -> dict[str, Tensor]:
        """The full state dict used for ``task`` (the same base for shared methods).

        Keys the task changes are new tensors; the others are the base's own tensors, not
        copies (so serving costs one model, not two): copy before editing them in place.
        """
        self._check_task(task)
        if self.kind == "shared":
            return dict(self.base)
        payload = self.payloads[task]
        return self._with_deltas(lambda key: payload.delta(key, self.shared))

    def export(self, folder: str | os.PathLike, suite, task: str | None = None, *,
               shard_bytes: int = 2**30) -> str:
        """Write ``folder`` for transformers' ``from_pretrained``: ``task``'s weights with its
        head (or, with no task, a shared method's merged backbone alone) in safetensors shards
        named and indexed as the Hugging Face hub names them, beside the suite's config and
        tokenizer or processor. The suite maps the weights to its model's keys
        (``suite.export_state``) and writes the other files (``suite.export_files``); tensors
        go to the shards one at a time, so a model larger than memory streams through. An
        existing ``folder`` is replaced only when it is an export or shard folder the harness
        wrote. Returns the folder."""
        from harness.io.shards import ShardWriter

        if task is None and self.kind != "shared":
            raise ValueError(f"{self.method} is personalized: each task has its own weights; "
                             f"name a task (one of {self.tasks})")
        if task is None or self.kind == "shared":
            weights = self.base
        else:
            self._check_task(task)
            weights = _TaskWeights(self, task)      # each key decoded when it is written
        state = suite.export_state(task, weights)
        writer = ShardWriter(os.fspath(folder), shard_bytes, hub_names=True)
        try:
            for key in state:
                writer[key] = state[key]
            writer.add_file("the suite's config and tokenizer",
                            lambda work: suite.export_files(task, work))
            writer.finish()
        except BaseException:
            writer.discard()
            raise
        return os.fspath(folder)

    def weights_for_unseen(self, gamma: Mapping[str, float] | None = None) -> dict[str, Tensor]:
        """Weights for a task no model was fine-tuned on.

        With ``gamma`` (seen task -> weight), a personalized result serves
        ``base + sum_n gamma_n * delta_n`` (paper eq. 8); without it, the method's own rule.
        """
        if self.kind == "shared":
            return dict(self.base)
        if gamma is not None:
            for task in gamma:
                self._check_task(task)

            def weighted(key: str) -> Tensor | None:
                total = None
                for task, g in gamma.items():
                    d = self.payloads[task].delta(key, self.shared)
                    if d is not None:
                        total = d * g if total is None else total + d * g
                return total
            return self._with_deltas(weighted)
        if self.unseen.get("weighted"):
            raise ValueError(f"{self.method} serves unseen tasks by similarity weights: "
                             "pass gamma (seen task -> weight)")
        name = self.unseen.get("shared")
        if not name:
            return dict(self.base)
        scale = float(self.unseen.get("scale", 1.0))
        shared = self.shared[name]
        return self._with_deltas(lambda key: to_float32(shared[key]) * scale if key in shared else None)

    def apply(self, model, task: str, *, prefix: str = ""):
        """Switch ``model`` (a module holding this result's base) to ``task`` in place, key by
        key; returns a handle whose ``undo()`` (or ``with`` exit) restores the base exactly.
        ``prefix`` is prepended to this result's keys to find the model's tensors."""
        from harness.engine.serving import apply

        return apply(self, model, task, prefix=prefix)

    def attach_low_rank(self, model, task: str, *, prefix: str = "", keep: str = "factors"):
        """Serve ``task`` without building its full deltas: each low-rank delta (DTS, svd) runs
        as ``x V^T diag(S) U^T`` beside its linear layer; the rest is switched in place.
        ``keep="factors"`` keeps the decoded float32 factors on the layer's device (fastest);
        ``keep="codes"`` keeps only the stored codes there and decodes them at every forward
        (a resident task costs about its stored bytes). The handle's ``held_bytes`` says which
        it cost."""
        from harness.engine.serving import attach_low_rank

        return attach_low_rank(self, model, task, prefix=prefix, keep=keep)

    def _with_deltas(self, delta_of) -> dict[str, Tensor]:
        return {key: self._with_delta(key, delta_of) for key in self.base.keys()}

    def _with_delta(self, key: str, delta_of) -> Tensor:
        base = self.base[key]
        delta = delta_of(key) if base.is_floating_point() else None
        return base if delta is None else cast_like(to_float32(base) + delta, base.dtype)

    # ---- accounting ----------------------------------------------------------------------
    @property
    def paper_bits(self) -> dict[str, float] | None:
        """The paper's bit count per task, where the method gives one (DTS), else None."""
        return self.accounting.get("paper_bits")

    def stored_bytes(self, task: str) -> int:
        """Bytes of ``task``'s own payload as stored (0 for shared methods)."""
        self._check_task(task)
        payload = self.payloads.get(task)
        return payload.nbytes() if payload is not None else 0

    def amr(self, count: str = "stored") -> dict[str, float]:
        """Per-task AMR in percent: from stored bytes, or ``count="paper"`` (DTS only)."""
        if count == "stored":
            return {t: amr_percent(self.stored_bytes(t), self.merged_params) for t in self.tasks}
        if count == "paper":
            if self.paper_bits is None:
                raise ValueError(f"{self.method} has no paper bit count; use count='stored'")
            return {t: amr_percent(self.paper_bits[t] / 8, self.merged_params) for t in self.tasks}
        raise ValueError(f"count must be 'stored' or 'paper', not {count!r}")

    # ---- storage ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the result to ``directory`` atomically: complete or not at all, replacing only
        a stored result (:mod:`harness.engine.storage`)."""
        save_result(self, os.fspath(directory))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MergeResult:
        """Read a result written by :meth:`save`, verifying its manifest, checksums and every
        payload's fit before anything is decoded."""
        return load_result(cls, os.fspath(directory))

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteOutputError` naming the first tensor holding NaN or Inf: the
        base, the shared tensors, or a task's payload (an overflowing hyperparameter or task
        vector shows here before a record is written)."""
        def check(where: str, tensor: Tensor) -> None:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteOutputError(f"{self.method} produced non-finite values in {where}"
                                           " (a hyperparameter or task vector overflows float32)")
        for key in self.base.keys():
            check(f"key {key!r} of the merged model", self.base[key])
        for name, state in self.shared.items():
            for key in state.keys():
                check(f"key {key!r} of its shared tensors {name!r}", state[key])
        for task, payload in self.payloads.items():
            for key, codec in payload.records.items():
                for field_name, tensor in codec.tensors().items():
                    check(f"the payload of task {task!r}, key {key!r} ({field_name})", tensor)
            if payload.scale is not None:
                check(f"the scale of task {task!r}", payload.scale)
        name, scale = self.unseen.get("shared"), self.unseen.get("scale", 1.0)
        if name and scale != 1.0:
            for key in self.shared[name].keys():
                check(f"key {key!r} served to unseen tasks ({scale} * {name})",
                      to_float32(self.shared[name][key]) * scale)


class _TaskWeights(Mapping):
    """``result.weights_for(task)`` key by key: each tensor decoded when asked for (the same
    values), so an export streams a model larger than memory."""

    def __init__(self, result: MergeResult, task: str) -> None:
        self._result, self._payload = result, result.payloads[task]

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._result.base:
            raise KeyError(key)
        return self._result._with_delta(
            key, lambda k: self._payload.delta(k, self._result.shared))

    def __iter__(self):
        return iter(self._result.base.keys())

    def __len__(self) -> int:
        return len(self._result.base)

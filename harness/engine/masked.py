"""A shared tensor per key and a 1-bit mask per task over it: the template of EMR and TALL-Mask.

The method gives a :class:`MaskRule`: per row block, from the tasks' float32 task vectors, the
shared block and each task's boolean mask (elementwise across tasks, so row blocks give the
bits of whole keys). The engine runs it over every float key, checks the values on the same
blocks, stores the shared tensor (in memory or streamed) and each task's mask packed at one bit
per entry (:class:`Mask`), skips keys no task changed (outside the AMR parameter set), and builds
the personalized result. A task is served ``theta_0 + scale_t * (mask_t * shared)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from harness.core.bits import unpack_bits
from harness.core.spec import ModelSpec, ValueChecks
from harness.engine.codecs import PackedCodec, TaskPayload
from harness.engine.method import MergeMethod
from harness.engine.outputs import building, finish_output
from harness.engine.passes import inspect_models, shared_and_masks
from harness.engine.result import MergeResult
from harness.io.pages import iter_keys


@dataclass
class Mask(PackedCodec):
    """A 1-bit mask over a shared tensor: the delta is ``mask * shared`` (EMR, TALL-Mask)."""

    bits: Tensor  # packed
    shape: tuple[int, ...]
    kind: ClassVar[str] = "mask"

    def decode(self, shared=None):
        if shared is None:
            raise ValueError("a mask payload needs its shared tensor to decode")
        mask = unpack_bits(self.bits, 1, math.prod(self.shape)).bool().reshape(self.shape)
        return torch.where(mask, shared, torch.zeros((), dtype=shared.dtype))

    def tensors(self):
        return {"bits": self.bits}

    @classmethod
    def from_stored(cls, meta, tensors):
        return cls(tensors["bits"], cls.stored_shape(meta, tensors, {"bits"}, "bits", 1))


class MaskRule:
    """One merge's masking rule; its state lives for that merge only."""

    def block(self, taus: Sequence[Tensor]) -> tuple[Tensor, Sequence[Tensor]]:
        """The shared float32 block and each task's bool mask of one row block."""
        raise NotImplementedError

    def key_done(self, stored: bool, numel: int) -> None:
        """After each key: whether it was stored (some task changed it), and its size."""


@dataclass(frozen=True)
class MaskedSharedMerge(MergeMethod):
    """The template; a method gives ``shared_name``, :meth:`mask_rule` and :meth:`finish`."""

    kind = "personalized"
    shared_name: ClassVar[str] = "shared"

    def mask_rule(self, spec: ModelSpec) -> MaskRule:
        raise NotImplementedError

    def finish(self, rule: MaskRule, spec: ModelSpec) -> tuple[dict[str, float] | None, dict,
                                                              dict]:
        """(each task's scale or None, how unseen tasks are served, JSON info) once every key
        is done."""
        raise NotImplementedError

    def merge(self, pretrained, finetuned, *, progress=False):
        spec = inspect_models(pretrained, finetuned, values=False)  # checked while merging
        checks = ValueChecks(spec)
        rule = self.mask_rule(spec)
        records: dict[str, dict] = {t: {} for t in spec.tasks}
        with building(self.shared_name) as output:
            for key in iter_keys(spec.float_keys, self.name, progress):
                shared, bits = shared_and_masks(pretrained, finetuned, spec, key, rule.block,
                                                checks)
                stored = not checks.unchanged(key)
                rule.key_done(stored, shared.numel())
                if not stored:
                    continue
                output[key] = shared
                for task, packed in zip(spec.tasks, bits):
                    records[task][key] = Mask(packed, tuple(shared.shape))
            checks.finish()
            output = finish_output(output)
        scales, unseen, info = self.finish(rule, spec)
        payloads = {t: TaskPayload(records[t], None if scales is None else
                                   torch.tensor(scales[t], dtype=torch.float32),
                                   shared=self.shared_name) for t in spec.tasks}
        return MergeResult(self.name, self.params(), pretrained, spec.tasks, kind=self.kind,
                           payloads=payloads, shared={self.shared_name: output},
                           merged_params=spec.merged_params, unseen=unseen, info=info)

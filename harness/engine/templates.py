"""The two shapes most merge methods take, so that a method's file holds only its rule.

- :class:`SharedMerge`: one merged model from a rule over each key's float32 inputs, by row
  block when the rule treats every entry on its own (Task Arithmetic, Weight-Averaging, DARE).
- :class:`PayloadMerge`: a per-task codec of each task's delta against a base (T-Switch, the SVD
  baseline, DTS).
- :class:`DataMerge`: a merge that sees unlabeled task inputs (RegMean, Fisher, AdaMerging).

Both leave the protocol to the engine: validation and value checks, read-once or read-twice,
device placement, output containers, spilling. EMR and TALL-Mask take a third shape,
:class:`harness.engine.masked.MaskedSharedMerge`; TIES writes its own loop on the engine's
passes and deferred entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from harness.core.data import TaskInputs
from harness.core.errors import MergeInputError
from harness.core.spec import ModelSpec
from harness.core.tensors import StateDict
from harness.engine.codecs import Codec, TaskPayload
from harness.engine.method import MergeMethod
from harness.engine.passes import BlockedDelta, encode_deltas, inspect_models, merge_shared
from harness.engine.result import MergeResult
from harness.io.resume import ResumeState

BlockRule = Callable[[str, Tensor, list[Tensor], Tensor], Tensor]
FusedRule = Callable[[Tensor, Tensor, list[Tensor]], list[int]]
Encoder = Callable[[str, "Tensor | BlockedDelta"], "Codec | None"]


@dataclass(frozen=True)
class SharedMerge(MergeMethod):
    """One merged model, ``rule(key, theta0, inputs, out)`` per key or row block.

    ``theta0`` is the pretrained block in float32, ``inputs`` the tasks' float32 task vectors
    (their weights with ``merges_weights``), ``out`` a float32 scratch block shaped like
    ``theta0`` the rule may write its result into; the result is stored (in the key's dtype)
    before the next block is made, and the inputs are scratch too. With ``elementwise`` the rule
    treats every entry on its own, so large keys go through in row blocks with the same bits.
    The values are checked on the blocks this pass reads anyway.
    """

    elementwise = True
    merges_weights = False
    # the output is non-finite wherever an input is (sums and products, no dropped entry): the
    # value checks then run on the output and only a bad block's inputs are checked again
    propagates_nonfinite = False
    # the rule keeps no state from block to block (no generator drawing in row order, no
    # buffer of its own), so blocks may run at once on several threads: the same bits
    parallel_blocks = False

    def rule(self, spec: ModelSpec) -> BlockRule:
        """The rule for one merge of models described by ``spec``."""
        raise NotImplementedError

    def fused_rule(self, spec: ModelSpec) -> FusedRule | None:
        """Optionally, the same rule as one pass over the raw blocks:
        ``fused(out, theta0, sources)`` writes into the float32 block ``out`` what :meth:`rule`
        gives from ``theta0`` and the tasks' blocks ``sources`` (all float32, contiguous, on
        the CPU: others take :meth:`rule`), with the same bits, and returns per task the number
        of entries that differ from ``theta0``. Requires ``propagates_nonfinite``: the
        output's non-finite entries stand for the inputs'. None (the default): no fused form."""
        return None

    def merge(self, pretrained, finetuned, *, progress=False):
        spec = inspect_models(pretrained, finetuned, values=False)  # checked while merging
        base = merge_shared(pretrained, finetuned, spec, self.rule(spec), self.name, progress,
                            elementwise=self.elementwise, weights=self.merges_weights,
                            propagates_nonfinite=self.propagates_nonfinite,
                            parallel=self.parallel_blocks, fused_rule=self.fused_rule(spec))
        return MergeResult(self.name, self.params(), base, spec.tasks,
                           merged_params=spec.merged_params)


@dataclass(frozen=True)
class DataMerge(MergeMethod):
    """A merge that sees data (``needs_data``): ``merge(..., data=TaskInputs)`` checks that the
    inputs are there (and the tasks' classifiers, with ``needs_task_models``), validates the
    models, then calls :meth:`merge_with_data`. The subclass declares ``examples`` and
    ``batch_size`` hyperparameters; ``data_split`` is where its inputs come from."""

    needs_task_models: ClassVar[bool] = False
    data_split: ClassVar[str] = "validation"
    # an iterative merge that takes ``resume=`` (a :class:`~harness.io.resume.ResumeState`) in
    # :meth:`merge_with_data`, saves its progress there and continues from it
    resumable: ClassVar[bool] = False

    def data_request(self) -> dict:
        request = {"examples": self.examples, "batch_size": self.batch_size}
        return request if self.data_split == "validation" else {**request,
                                                                 "split": self.data_split}

    def merge(self, pretrained, finetuned, *, progress=False, data: TaskInputs | None = None,
              resume: ResumeState | None = None):
        if data is None or (self.needs_task_models and data.task_model is None):
            raise MergeInputError(
                f"{self.name} needs {self.needs_data}: pass data=suite.task_inputs(tasks, "
                "**method.data_request())" + (" from a suite whose inputs come with task "
                                             "models" if self.needs_task_models else ""))
        spec = inspect_models(pretrained, finetuned)
        missing = [t for t in spec.tasks if not data.batches.get(t)]
        if missing:
            raise MergeInputError(f"{self.name}: no unlabeled inputs for task(s) {missing}")
        if resume is not None and self.resumable:
            return self.merge_with_data(spec, pretrained, finetuned, data, progress,
                                        resume=resume)
        return self.merge_with_data(spec, pretrained, finetuned, data, progress)

    def merge_with_data(self, spec: ModelSpec, pretrained: StateDict,
                        finetuned: Mapping[str, StateDict], data: TaskInputs,
                        progress: bool) -> MergeResult:
        raise NotImplementedError


@dataclass(frozen=True)
class PayloadMerge(MergeMethod):
    """A codec per task and changed key: ``encoder(spec, plan)(key, delta)`` of each non-zero float32
    delta against the base, or None to store nothing for it. Keys for which ``blocked(spec)``
    holds arrive as a :class:`~harness.engine.passes.BlockedDelta`, never whole. Unseen tasks get
    the base unless :meth:`facts` says otherwise."""

    kind = "personalized"

    def base(self, pretrained: StateDict, finetuned: Mapping[str, StateDict], progress: bool
             ) -> tuple[ModelSpec, StateDict]:
        """The validated spec and the base the deltas are taken against (the pretrained
        model, by default)."""
        return inspect_models(pretrained, finetuned), pretrained

    def plan(self, spec: ModelSpec):
        """Whatever this merge decides from the models before encoding (the SVD baseline's
        matched density), handed to :meth:`encoder` and :meth:`facts`; None by default."""
        return None

    def encoder(self, spec: ModelSpec, plan) -> Encoder:
        raise NotImplementedError

    def blocked(self, spec: ModelSpec) -> Callable[[str], bool] | None:
        return None

    def facts(self, spec: ModelSpec, plan) -> dict:
        """Extra :class:`MergeResult` fields (accounting, unseen, info) of this merge."""
        return {}

    def merge(self, pretrained, finetuned, *, progress=False):
        spec, base = self.base(pretrained, finetuned, progress)
        return self.encode(spec, base, finetuned, progress)

    def encode(self, spec: ModelSpec, base: StateDict, finetuned: Mapping[str, StateDict],
               progress: bool) -> MergeResult:
        """Every task's payload against ``base``, as a personalized result."""
        plan = self.plan(spec)
        records = encode_deltas(base, finetuned, spec, self.encoder(spec, plan), self.name,
                                progress, blocked=self.blocked(spec))
        return MergeResult(self.name, self.params(), base, spec.tasks, kind="personalized",
                           payloads={t: TaskPayload(r) for t, r in records.items()},
                           merged_params=spec.merged_params, **self.facts(spec, plan))

"""Unlabeled inputs that a suite hands to a merge that sees data (RegMean and its kind).

A method declares what it needs (``MergeMethod.needs_data``: a sentence, e.g. "the Gram
matrices of each linear layer's inputs"); a suite that can serve it sets
``Suite.provides_inputs`` and builds :class:`TaskInputs` from a bounded number of examples of
each task's validation (or train) split, never its test split. The run record states what the
merge saw (:meth:`TaskInputs.summary`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from harness.core.tensors import StateDict


@dataclass(frozen=True)
class TaskInputs:
    """Each task's input batches (each one ``forward`` argument of the suite's backbone, without
    labels) and ``backbone(weights)``: a module holding a backbone state dict whose ``forward``
    takes one batch; ``task_model(task, weights)``, where the suite has heads, the task's whole
    classifier (merges that need the model's own predictions: Fisher). ``split`` names where
    the examples come from."""

    split: str
    batches: Mapping[str, Sequence[Any]]
    backbone: Callable[[StateDict], nn.Module]
    # task, backbone -> the task's classifier: its submodule ``backbone`` holds the backbone
    # (parameter ``backbone.<key>`` for each key), ``forward(batch)`` returns the task's logits
    task_model: Callable[[str, StateDict], nn.Module] | None = None

    def examples(self, task: str) -> int:
        """How many examples of ``task`` the batches hold (their first dimension)."""
        return sum(len(batch) for batch in self.batches[task])

    def summary(self) -> dict:
        """What a merge saw, for its record: the split, and per task the examples and batches."""
        return {"split": self.split,
                "examples": {task: self.examples(task) for task in self.batches},
                "batches": {task: len(batches) for task, batches in self.batches.items()}}

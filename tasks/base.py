"""The suite contract: tasks, the seen/unseen split, loading, evaluation, method defaults.

A suite hands the runner backbone state dicts with every task head removed (heads are never
merged) and evaluates a backbone state dict on one task with that task's own head attached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from harness.core.data import TaskInputs
from harness.core.defaults import default_cache_dir
from harness.core.tensors import StateDict


class SuiteUnavailableError(RuntimeError):
    """A suite's checkpoints or data cannot be found; the message says what to provide."""


@dataclass(frozen=True)
class Task:
    """One task of a suite."""

    name: str
    labels: tuple[str, ...]          # class names, in label-id order
    description: str                 # one sentence, for the unseen-task variant
    metric: str = "accuracy"         # spec, Accounting


@dataclass(frozen=True)
class DownloadSource:
    """Something the first run downloads: what it is, and the URL it comes from (None, with
    ``problem`` saying why, when the download cannot even be attempted)."""

    what: str
    url: str | None
    problem: str | None = None


@dataclass
class Evaluation:
    """A task's score: the headline metric (a fraction in [0, 1], or a correlation) and extras.

    ``outcomes`` holds the per-example results the metric comes from, in the test set's order
    (the same order for every model), so the metric can be recomputed on resamples for
    intervals and paired comparisons: ``{"score": ...}`` when the metric is the mean of
    per-example scores (accuracy: 1 per correct example), else ``{"prediction": ...,
    "reference": ...}`` (see :func:`harness.core.metrics.metric_from_outcomes`)."""

    metric: str
    value: float
    extras: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    outcomes: dict[str, Tensor] | None = None


class Suite:
    """Base class of every suite; subclasses fill in the class attributes and the loaders."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    tasks: ClassVar[tuple[Task, ...]] = ()
    unseen: ClassVar[tuple[str, ...]] = ()         # evaluated on the unseen split only
    method_defaults: ClassVar[dict[str, dict]] = {}
    builds: ClassVar[bool] = False                 # trains its own models (pinned builds)
    # modules a sweep's worker imports once, before forking this suite's jobs (the model
    # classes its evaluation builds: transformers imports them on first use, seconds each)
    warm_imports: ClassVar[tuple[str, ...]] = ()
    finetune_seed: int = 0          # which fine-tuning of the suite's task models (builders)

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir or default_cache_dir()

    # ---- fine-tuning seeds (suites that build their task models) -------------------------
    def _set_finetune_seed(self, seed: int, recipe: dict) -> dict:
        """Select fine-tuning ``seed`` (0: the suite's recipe as published) and return the
        build ``recipe`` under it. Another seed gives another set of task models from the same
        backbone and data, kept in its own cache folder and told apart in result files, to show
        the spread between fine-tunings; seed 0 keeps the recipe (and so its cache key)."""
        check_finetune_seed(seed)
        self.finetune_seed = seed
        return {**recipe, "finetune_seed": seed} if seed else recipe

    def training_seed(self, seed: int) -> int:
        """The seed a task's fine-tuning uses where the recipe says ``seed``: unchanged under
        fine-tuning seed 0 (so default builds keep their bytes), shifted by a large prime
        stride under any other, so no two (task, fine-tuning seed) pairs share a stream."""
        return seed + FINETUNE_SEED_STRIDE * self.finetune_seed

    def cache_folder(self) -> str:
        """The folder of this suite's built models: ``<cache>/<suite>``, or
        ``<cache>/<suite>-finetune-seed-<n>`` under another fine-tuning seed."""
        name = self.name if not self.finetune_seed else \
            f"{self.name}-finetune-seed-{self.finetune_seed}"
        return os.path.join(self.cache_dir, name)

    # ---- the split -----------------------------------------------------------------------
    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"suite {self.name!r} has no task {name!r}; tasks: "
                       f"{[t.name for t in self.tasks]}")

    def split_tasks(self, split: str) -> list[str]:
        """Task names of the ``seen`` split (merged) or the ``unseen`` split (evaluated only)."""
        if split == "seen":
            return [t.name for t in self.tasks if t.name not in self.unseen]
        if split == "unseen":
            return list(self.unseen)
        raise ValueError(f"split must be 'seen' or 'unseen', not {split!r}")

    def defaults_for(self, method: str) -> dict:
        return dict(self.method_defaults.get(method, {}))

    # ---- to be provided by each suite -----------------------------------------------------
    def check(self) -> None:
        """Raise :class:`SuiteUnavailableError` naming anything missing, before any long work."""

    def built(self) -> bool:
        """Whether every model the suite trains itself is in its cache from a pinned build
        (:mod:`harness.core.reproducible`); suites that train nothing (``builds`` False) are
        always built. The runner builds the rest in a pinned child process first."""
        return True

    def first_run_plan(self) -> list[str]:
        """What the next run must still download and build before it can merge, one line each
        with its size and a time estimate ([] when everything is in place). ``harness
        validate`` prints it, so a cold start is never a surprise."""
        return []

    def download_sources(self) -> list[DownloadSource]:
        """Where the downloads of ``first_run_plan`` come from, for ``harness validate`` to
        check that they are reachable ([] when nothing is left to download). Hub checkpoints
        and datasets are checked by :meth:`check` itself."""
        return []

    def prepare(self, progress: bool = True) -> None:
        """Build or fetch whatever the suite needs (cached); called before loading."""

    def finetune(self, progress: bool = True, device: str = "cpu") -> str:
        """``harness finetune``: produce the suite's task models; returns what was made where."""
        self.check()
        self.prepare(progress=progress)
        return f"{self.name} task models are in {self.cache_dir}"

    def load_pretrained(self) -> StateDict:
        raise NotImplementedError

    def load_finetuned(self, task: str) -> StateDict:
        raise NotImplementedError

    def evaluate(self, task: str, backbone: StateDict, *, split: str = "test",
                 device: str = "cpu", progress: bool = False) -> Evaluation:
        raise NotImplementedError

    def has_validation(self) -> bool:
        return False

    def task_embedding(self, task: str) -> Tensor:
        """A unit vector describing the task, for similarity weights on unseen tasks."""
        raise NotImplementedError(f"suite {self.name!r} has no task embeddings")

    # ---- exporting a merged model (harness export, MergeResult.export) ----------------------
    exports: ClassVar[bool] = False        # whether export_state/export_files are implemented

    def export_state(self, task: str | None, backbone: StateDict) -> StateDict:
        """The state dict of the transformers model of ``task`` (the merged ``backbone`` and the
        task's head, under the model's own key names), or of the backbone alone (task None)."""
        raise SuiteUnavailableError(f"suite {self.name!r} has no transformers model format to "
                                    "export to")

    def export_files(self, task: str | None, folder: str) -> None:
        """Write what ``from_pretrained`` needs beside the weights into ``folder``: the config
        (with the task's labels) and the tokenizer or processor."""
        raise SuiteUnavailableError(f"suite {self.name!r} has no transformers model format to "
                                    "export to")

    # ---- unlabeled inputs for merges that see data (RegMean, Fisher, AdaMerging) -----------
    provides_inputs: ClassVar[bool] = False    # whether the three hooks below are implemented

    def task_inputs(self, tasks: list[str], *, examples: int, batch_size: int,
                    split: str = "validation") -> TaskInputs:
        """The first ``examples`` inputs of each task's ``split`` (``validation``; ``test`` only
        for a method that, as its paper does, adapts to unlabeled test inputs: AdaMerging),
        without labels, in batches of ``batch_size``, and the modules they run through, from
        :meth:`unlabeled_inputs`, :meth:`backbone_module` and :meth:`classifier_module`."""
        if not self.provides_inputs:
            raise SuiteUnavailableError(f"suite {self.name!r} provides no unlabeled inputs to "
                                        "merges that see data")
        if split not in ("validation", "test"):
            raise ValueError(f"{self.name}: inputs come from 'validation' or 'test', not "
                             f"{split!r}")
        batches = {task: list(self.unlabeled_inputs(task, split, examples).split(batch_size))
                   for task in tasks}
        return TaskInputs(split, batches, self.backbone_module, self.classifier_module)

    def unlabeled_inputs(self, task: str, split: str, count: int) -> Tensor:
        """The first ``count`` inputs of ``task``'s ``split`` as the backbone takes them."""
        raise NotImplementedError

    def backbone_module(self, backbone: StateDict) -> nn.Module:
        """A module holding ``backbone`` whose ``forward`` takes a batch of inputs."""
        raise NotImplementedError

    def classifier_module(self, task: str, backbone: StateDict) -> nn.Module:
        """``task``'s classifier with ``backbone`` under its submodule ``backbone`` (parameter
        ``backbone.<key>`` for each key), its own head kept; ``forward`` gives the logits."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What, besides the method, tells this suite's result files apart (a user config, a
        fine-tuning seed other than 0); {} for the suite as published."""
        return {"finetune_seed": self.finetune_seed} if self.finetune_seed else {}

    def provenance(self) -> dict:
        """What produced the suite's models and data (recorded in every result)."""
        return {"suite": self.name}


FINETUNE_SEED_STRIDE = 1_000_003
MAX_FINETUNE_SEED = 1000


def check_finetune_seed(seed) -> None:
    if type(seed) is not int or not 0 <= seed <= MAX_FINETUNE_SEED:
        raise ValueError(f"--finetune-seed must be an integer in [0, {MAX_FINETUNE_SEED}], "
                         f"got {seed!r}")


def restrict(stored: StateDict, keys: list[str], problem: str) -> StateDict:
    """``stored`` limited to ``keys``; a missing key raises with ``problem`` in the message."""
    missing = [k for k in keys if k not in stored]
    if missing:
        raise SuiteUnavailableError(f"{problem}: {missing[:3]} missing")
    return {k: stored[k] for k in keys}


def unit(vector: Tensor) -> Tensor:
    return vector / torch.linalg.vector_norm(vector).clamp(min=1e-12)

"""The part shared by suites that fine-tune their own task models from one backbone and cache them.

Each task model is fine-tuned once (backbone plus the task's own head, from a seed), stored in a
:class:`CheckpointCache` under the suite's recipe, and split into backbone (merged) and head
(kept per task) when loaded.
"""

from __future__ import annotations

import functools

import os
from functools import cached_property
from typing import ClassVar

from torch import Tensor

from harness.core.tensors import StateDict
from harness.tasks.base import Suite, SuiteUnavailableError
from harness.tasks.cache import CheckpointCache
from harness.tasks.embeddings import SentenceEncoder, default_minilm_dir


class FinetunedSuite(Suite):
    """A suite that builds its task models itself; subclasses define data, model and training."""

    recipe: ClassVar[dict] = {}

    def __init__(self, cache_dir: str | None = None, *, encoder: str | None = None,
                 data_key: str = "", finetune_seed: int = 0) -> None:
        super().__init__(cache_dir)
        self.recipe = self._set_finetune_seed(finetune_seed, self.recipe)
        self.folder = self.cache_folder()
        self.cache = CheckpointCache(self.folder, {**self.recipe, "data": data_key})
        self._encoder_name = encoder
        self._heads: dict[str, dict[str, Tensor]] = {}

    # ---- to be provided ------------------------------------------------------------------
    def labels(self, task: str) -> list[str]:
        raise NotImplementedError

    def _finetune(self, task: str, progress: bool) -> dict[str, Tensor]:
        """The full fine-tuned state dict (backbone and head) of ``task``."""
        raise NotImplementedError

    def split_state(self, full: StateDict) -> tuple[StateDict, dict[str, Tensor]]:
        """(backbone, head) of a full task-model state dict."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------
    builds = True

    def built(self) -> bool:
        return all(self.cache.has(f"task-{t.name}")
                   and self.cache.pinned(self.cache.path(f"task-{t.name}")) for t in self.tasks)

    minutes_per_task_model: ClassVar[float] = 1.0    # a pinned build on a 2-core machine
    downloads: ClassVar[tuple] = ()

    def first_run_plan(self) -> list[str]:
        """Missing downloads (``missing_downloads``), then the task models to fine-tune."""
        plan = self.missing_downloads()
        missing = [t.name for t in self.tasks if not self.cache.has(f"task-{t.name}")]
        if missing:
            plan.append(f"fine-tune {len(missing)} task model(s) reproducibly into "
                        f"{self.folder} (one thread: about "
                        f"{self.minutes_per_task_model * len(missing):.0f} min on a 2-core "
                        "machine, see docs/performance.md)")
        return plan

    def missing_downloads(self) -> list[str]:
        """The downloads the first run makes, one line each with its size ([] when cached)."""
        return []

    def prepare(self, progress: bool = True) -> None:
        """Fetch the data and fine-tune every task model that is not cached yet."""
        from harness.core.progress import progress as bar

        missing = [t.name for t in self.tasks if not self.cache.has(f"task-{t.name}")]
        for task in bar(missing, f"{self.name}: fine-tuning", enabled=progress and bool(missing),
                        lines=True):
            self.cache.ensure(f"task-{task}", functools.partial(self._finetune, task, progress),
                              steps=self.recipe["steps"])

    def _entry(self, task: str) -> StateDict:
        self.task(task)
        if not self.cache.has(f"task-{task}"):
            raise SuiteUnavailableError(
                f"{self.name}: task model {task!r} is not fine-tuned yet: run "
                f"`harness finetune --suite {self.name}`")
        return self.cache.get(f"task-{task}")

    def load_finetuned(self, task: str) -> StateDict:
        return self.split_state(self._entry(task))[0]

    def head(self, task: str) -> dict[str, Tensor]:
        if task not in self._heads:
            self._heads[task] = self.split_state(self._entry(task))[1]
        return self._heads[task]

    def has_validation(self) -> bool:
        return True

    @cached_property
    def encoder(self) -> SentenceEncoder:
        """The text encoder of task embeddings: the suite's MiniLM unless a user names one."""
        return SentenceEncoder(self._encoder_name or default_minilm_dir())

    def task_embedding(self, task: str) -> Tensor:
        """Mean of the unit sentence embeddings of the task's class names and its description,
        renormalized (the spec's sentence-encoder choice for non-CLIP suites)."""
        return self.encoder.task_embedding([*self.labels(task), self.task(task).description])

    def provenance(self) -> dict:
        encoder = {"encoder": self._encoder_name} if self._encoder_name else {}
        return {"suite": self.name, "recipe": self.recipe, **encoder,
                "checkpoints": {f"task-{t.name}": self.cache.info(f"task-{t.name}")["sha256"]
                                for t in self.tasks if self.cache.has(f"task-{t.name}")}}

"""The reference rows of a suite: the pretrained and the individually fine-tuned models'
scores, measured once per suite and set of models and kept as result records (with provenance and
per-example outcomes), which ADR, its interval and the leaderboard read."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Protocol

import numpy

from harness.bench.build import UNPINNED_BUILDS
from harness.bench.provenance import run_provenance
from harness.bench.records import (RunRecord, TaskScore, hyperparameter_tag, json_safe,
                                   read_outcomes, read_records, record_path, write_record)
from harness.bench.uncertainty import interval, row_replicates
from harness.core.progress import progress, say
from harness.tasks.base import Evaluation, Suite

REFERENCE_ROWS = ("pretrained", "individual")


class ReferenceOptions(Protocol):
    """What these functions read of a run's options (a :class:`~harness.bench.runner.RunConfig`)."""

    results_dir: str
    force_references: bool      # measure the reference rows again, ignoring stored records
    device: str
    quiet: bool


def task_score(e: Evaluation) -> TaskScore:
    """A suite's evaluation of one task as the record stores it."""
    return TaskScore(e.metric, e.value, dict(e.extras), e.examples)


def mean_score(tasks: dict[str, TaskScore]) -> float:
    """The plain mean of the tasks' scores (a row's average)."""
    return sum(t.value for t in tasks.values()) / len(tasks)


@dataclasses.dataclass
class References:
    """The pretrained and individual models' scores of every task, and their per-example
    outcomes where known (task -> arrays), for ADR and its interval."""

    scores: dict[str, dict[str, TaskScore]]
    outcomes: dict[str, dict[str, dict]]


def stored_references(suite: Suite, config: ReferenceOptions, *, outcomes: bool = False
                      ) -> dict[str, tuple[dict[str, TaskScore], dict[str, dict]]]:
    """Per reference row, the task scores (and, with ``outcomes``, per-example outcomes) its
    stored records hold for this suite and set of models (none with ``force_references``)."""
    fingerprint = hyperparameter_tag(suite.provenance())
    options = suite.identity()
    existing = {(r.method, r.split): r for r in read_records(
        os.path.join(config.results_dir, suite.name))[0]
        if r.method in REFERENCE_ROWS and (r.suite_options or {}) == options}
    stored = {}
    for row in REFERENCE_ROWS:
        per_task: dict[str, TaskScore] = {}
        per_example: dict[str, dict] = {}
        for split in ("seen", "unseen"):
            record = existing.get((row, split))
            if (record and record.suite_fingerprint == fingerprint
                    and not config.force_references):
                per_task.update(record.tasks)
                if outcomes:
                    per_example.update(read_outcomes(record)[0] or {})
        stored[row] = (per_task, per_example)
    return stored


def suite_ready(suite: Suite, config: ReferenceOptions) -> bool:
    """Whether a run would find ``suite`` downloaded and built (as
    :func:`harness.bench.runner.ensure_built` wants it) and every reference score stored: then
    it fetches, builds and measures nothing that other runs of the suite would too."""
    if suite.first_run_plan() or (suite.builds and not suite.built()
                                  and os.environ.get(UNPINNED_BUILDS) != "1"):
        return False
    names = {t.name for t in suite.tasks}
    return all(names <= set(per_task) for per_task, _ in stored_references(suite, config).values())


def reference_scores(suite: Suite, config: ReferenceOptions) -> References:
    """Individual (fine-tuned) and pretrained metrics of every task, measured once per suite
    and kept as result records (with provenance and per-example outcomes) that ADR and the
    leaderboard read."""
    scores: dict[str, dict[str, TaskScore]] = {}
    outcomes: dict[str, dict[str, dict]] = {}
    fingerprint = hyperparameter_tag(suite.provenance())
    options = suite.identity()
    stored = stored_references(suite, config, outcomes=True)
    for row in REFERENCE_ROWS:
        per_task, per_example = stored[row]
        missing = [t.name for t in suite.tasks if t.name not in per_task]
        if missing:
            start = time.perf_counter()
            say(f"{suite.name}: measuring the {row} model on {len(missing)} tasks"
                + (" again (--force-references)" if config.force_references else
                   " (once per suite and set of models)"), quiet=config.quiet)
            pretrained = suite.load_pretrained() if row == "pretrained" else None
            for task in progress(missing, f"{row} model", enabled=not config.quiet, leave=False):
                backbone = pretrained if row == "pretrained" else suite.load_finetuned(task)
                evaluation = suite.evaluate(task, backbone, device=config.device,
                                            progress=not config.quiet)
                per_task[task] = task_score(evaluation)
                if evaluation.outcomes is not None:
                    per_example[task] = evaluation.outcomes
            seconds = time.perf_counter() - start
            for split in ("seen", "unseen"):
                names = suite.split_tasks(split)
                if not names:
                    continue
                tasks = {t: per_task[t] for t in names}
                record = RunRecord(suite.name, split, row, row.title(), status="reference",
                                   suite_fingerprint=fingerprint,
                                   suite_options=json_safe(options) or None,
                                   task_order=names, tasks=tasks,
                                   average=mean_score(tasks), eval_seconds=seconds,
                                   provenance=run_provenance(suite, config.device))
                known = {t: per_example[t] for t in names if t in per_example}
                known = known if len(known) == len(names) else None
                with_intervals(record, known)
                write_record(record_path(config.results_dir, suite.name, split, row,
                                         json_safe(options), 0), record, known)
        scores[row] = per_task
        outcomes[row] = per_example
    return References(scores, outcomes)


def with_intervals(record: RunRecord, outcomes: dict | None,
                   individual: dict | None = None) -> RunRecord:
    """Fill ``record``'s bootstrap intervals (per task, average, ADR) from its per-example
    ``outcomes``; with none, the record keeps no interval (never an invented one)."""
    if not outcomes or any(t not in outcomes for t in record.task_order):
        return record
    metrics = {t: record.tasks[t].metric for t in record.task_order}
    replicates = row_replicates(metrics, outcomes, individual)
    for task, values in replicates.tasks.items():
        record.tasks[task].interval = list(interval(values))
    record.average_interval = list(interval(replicates.average))
    if (replicates.adr is not None and record.adr is not None
            and bool(numpy.isfinite(replicates.adr).all())):    # ADR is undefined at 0
        record.adr_interval = list(interval(replicates.adr))
    return record

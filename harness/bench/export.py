"""``harness export``: merge a suite with a method and write models transformers loads.

The merge runs as ``harness run`` runs it (the same checks, build, suite defaults, per-task
selection on validation data), then :meth:`MergeResult.export` writes each model: with
``--task T`` one folder, the model served for T with its head; with ``--all-tasks`` a
personalized method's folder per seen task (``OUT/<task>/``) and a shared method's one folder,
its merged backbone (the heads stay per task: export one with ``--task``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from harness.bench.runner import (RunConfig, ensure_built, plan_cell, select_per_task,
                                  stream_folder)
from harness.core.tensors import merge_device
from harness.engine.outputs import stream_outputs


@dataclasses.dataclass
class Exported:
    task: str | None           # None: a shared method's backbone
    folder: str


def export(config: RunConfig, out: str, task: str | None = None) -> list[Exported]:
    """Merge as :func:`harness.bench.runner.run` does and export ``task``'s model to ``out``,
    or (task None) every seen task's (see the module docstring). Returns what was written."""
    suite, method, _ = plan_cell(config)      # validated, its seed applied
    if not suite.exports:                       # said before any merge
        suite.export_state(task, {})
    seen = suite.split_tasks("seen")
    if task is not None and task not in seen:
        raise ValueError(f"--task {task!r} is not a seen (merged) task of {suite.name}: "
                         f"{', '.join(seen)}")
    suite = ensure_built(suite, config)
    suite.prepare(progress=not config.quiet)
    pretrained = suite.load_pretrained()
    finetuned = {t: suite.load_finetuned(t) for t in seen}
    method = select_per_task(suite, method, pretrained, finetuned, config)
    streamed = (stream_outputs(stream_folder(config, suite, os.path.join(out, "merge.json")))
                if config.stream_dir else contextlib.nullcontext())
    with streamed, merge_device(config.device):
        result = method.merge(pretrained, finetuned, progress=not config.quiet)
    result.check_finite()
    if task is not None:
        return [Exported(task, result.export(out, suite, task))]
    if result.kind == "shared":
        return [Exported(None, result.export(out, suite))]
    os.makedirs(out, exist_ok=True)
    return [Exported(t, result.export(os.path.join(out, t), suite, t)) for t in seen]

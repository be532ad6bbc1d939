"""validate -> load -> merge -> evaluate -> record: one benchmark run of a method on a suite."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import time

import torch

from harness.bench.records import (AmrFigures, RunRecord, TaskScore, hyperparameter_tag,
                                   json_safe, read_record, record_path, write_record)
from harness.bench.build import UNPINNED_BUILDS, build_pinned
from harness.bench.provenance import (git_commit, peak_rss_bytes, reset_peak_rss,
                                      run_provenance)
from harness.bench.lookup import build_method, get_suite
from harness.bench.references import (References, mean_score, reference_scores, task_score,
                                      with_intervals)
from harness.bench.unseen import similarity_weights
from harness.core.accounting import adr
from harness.core.errors import MethodNotApplicable
from harness.core.defaults import DEFAULT_SUITE, default_results_dir
from harness.core.progress import say
from harness.core.registry import METHODS, SUITES
from harness.core.reproducible import is_pinned
from harness.core.tensors import merge_device
from harness.engine.method import MergeMethod
from harness.engine.outputs import stream_outputs
from harness.engine.result import MergeResult
from harness.io.files import check_writable_folder, sha256_file
from harness.io.resume import ResumeState
from harness.tasks.base import Suite


@dataclasses.dataclass
class RunConfig:
    method: str
    suite: str = DEFAULT_SUITE
    split: str = "seen"
    overrides: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    results_dir: str = dataclasses.field(default_factory=default_results_dir)   # per user
    cache_dir: str | None = None
    force: bool = False                # rerun the cell even when its record exists
    force_references: bool = False     # also measure the reference models again
    quiet: bool = False
    unseen_weighting: str = "method"   # "method": each method's own rule; "similarity": eq. 8
    suite_config: str | None = None    # a copy of the suite's TOML config (paper suites)
    encoder: str | None = None         # the text encoder of unseen-task embeddings
    stream_dir: str | None = None      # write model-sized merge outputs as shards here
    finetune_seed: int = 0             # which fine-tuning of a building suite's task models


def validate(config: RunConfig) -> tuple[Suite, MergeMethod]:
    """Everything that can be checked without reading a weight: names, hyperparameters, split,
    the suite's files. Raises with a message naming the problem."""
    if config.split not in ("seen", "unseen"):
        raise ValueError(f"--split must be 'seen' or 'unseen', not {config.split!r}")
    check_seed(config.seed)
    if config.unseen_weighting not in ("method", "similarity"):
        raise ValueError("unseen weighting must be 'method' or 'similarity'")
    suite = open_suite(config)
    method = build_method(suite, config.method, config.overrides)
    if not suite.split_tasks("seen"):
        raise ValueError(f"suite {suite.name!r} has no seen tasks to merge")
    if config.split == "unseen" and not suite.split_tasks("unseen"):
        raise ValueError(f"suite {suite.name!r} has no unseen tasks")
    if method.needs_data and not suite.provides_inputs:
        serving = [name for name in SUITES.names() if SUITES.get(name).provides_inputs]
        raise ValueError(f"method {method.name!r} sees data: it needs {method.needs_data}, "
                         f"and suite {suite.name!r} provides no unlabeled inputs (suites "
                         f"that do: {', '.join(serving) or 'none'})")
    check_device(config.device)
    check_writable_folder(config.results_dir, "--results")
    check_writable_folder(suite.cache_dir, "--cache-dir")
    if config.stream_dir:
        check_writable_folder(config.stream_dir, "--stream-dir")
    suite.check()
    return suite, method


MAX_SEED = 2**32 - 1


def seeds_to_run(config: RunConfig, seeds: list[int] | None) -> list[int]:
    """The seeds of a ``--seeds`` run: all of them for a method with a random seed, else just
    the first (its merge does not depend on one: said, not silently repeated)."""
    if not seeds:
        return [config.seed]
    cls = METHODS.get(config.method)
    if "seed" in {h.name for h in cls.hyperparameters()}:
        return seeds
    _log(config, f"{cls.name} has no random seed: one run, seed {seeds[0]}")
    return seeds[:1]


def ensure_built(suite: Suite, config: RunConfig) -> Suite:
    """The suite, its trained models built reproducibly first: when a suite that trains its
    models (``builds``) lacks some, or has some an unpinned process built, they are built in a
    pinned child process (:mod:`harness.bench.build`) and the suite is opened again. Setting
    ``MERGE_HARNESS_UNPINNED_BUILDS=1`` accepts unpinned builds (faster, not reproducible
    across machines; the tests use it)."""
    if (not suite.builds or suite.built() or is_pinned()
            or os.environ.get(UNPINNED_BUILDS) == "1"):
        return suite
    _log(config, f"{suite.name}: building its models reproducibly (one thread, portable "
                 "kernels: see docs/performance.md for the time it takes)")
    build_pinned(suite.name, suite.cache_dir, config.suite_config, quiet=config.quiet,
                 finetune_seed=config.finetune_seed)
    return open_suite(config)


def open_suite(config: RunConfig) -> Suite:
    return get_suite(config.suite, config.cache_dir, config=config.suite_config,
                     encoder=config.encoder, finetune_seed=config.finetune_seed)


def check_seed(seed: int) -> None:
    if type(seed) is not int or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in [0, {MAX_SEED}], got {seed}")


def check_device(device: str) -> None:
    """Raise unless ``device`` names a device torch knows and this machine has, on which merges
    and evaluation can run: cpu, cuda or cuda:N, mps."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps") \
            from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but torch sees no CUDA device")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                             "device(s)")
        return
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return
    raise ValueError(f"--device {device}: merges and evaluation run on cpu, cuda[:N] or mps, "
                     "where torch sees one")


def _log(config: RunConfig, message: str) -> None:
    say(message, quiet=config.quiet)


def selected_by_validation(suite: Suite, method: MergeMethod, config: RunConfig) -> str | None:
    """The hyperparameter the runner picks per task on validation data (TALL-Mask's lam, as
    the spec asks), when the method declares one (``tuned_per_task``), the user gave no value
    and the suite has a validation split; else None."""
    tuned = type(method).tuned_per_task
    if (tuned is None or config.split != "seen" or tuned.name in config.overrides
            or not suite.has_validation()):
        return None
    return tuned.name


def run_identity(suite: Suite, method: MergeMethod, config: RunConfig) -> dict:
    """What distinguishes one result file from another, besides suite, split and seed."""
    identity = {**method.params(), **suite.identity()}
    selected = selected_by_validation(suite, method, config)
    if selected:
        identity[selected] = "validation"
    if config.split == "unseen" and config.unseen_weighting != "method":
        identity["unseen_weighting"] = config.unseen_weighting
    return json_safe(identity)


def select_per_task(suite: Suite, method: MergeMethod, pretrained, finetuned,
                    config: RunConfig) -> MergeMethod:
    """``method`` with its per-task hyperparameter chosen by validation metric (see
    :func:`selected_by_validation`); unchanged when nothing is selected."""
    name = selected_by_validation(suite, method, config)
    if name is None:
        return method
    values = type(method).tuned_per_task.grid
    best: dict[str, tuple[float, float]] = {}
    for value in values:
        trial = dataclasses.replace(method, **{name: value})
        with merge_device(config.device):
            result = trial.merge(pretrained, finetuned)
        for task in result.tasks:
            score = suite.evaluate(task, result.weights_for(task), split="validation",
                                   device=config.device).value
            if task not in best or score > best[task][0]:
                best[task] = (score, value)
        _log(config, f"  validation {name}={value}: " +
             ", ".join(f"{t} {s:.3f}" for t, (s, v) in best.items() if v == value))
    return dataclasses.replace(method, **{name: {t: v for t, (_, v) in best.items()}})


def plan_cell(config: RunConfig) -> tuple[Suite, MergeMethod, str]:
    """The validated suite and method of a cell (its seed applied) and its record's path."""
    suite, method = validate(config)
    if "seed" in method.params() and "seed" not in config.overrides:
        method = dataclasses.replace(method, seed=config.seed)
    path = record_path(config.results_dir, suite.name, config.split, method.name,
                       run_identity(suite, method, config), config.seed)
    return suite, method, path


def stored_result(path: str, suite: Suite) -> tuple[RunRecord | None, str | None]:
    """(the record at ``path``, None) when it can stand for the cell: readable, measured or
    not applicable (not a failure), on the models and data the suite has now; else (None,
    why not)."""
    record, problem = read_record(path)
    if record is None:
        return None, problem
    if record.status == "failed":
        return None, f"the cell failed before ({record.reason})"
    fingerprint = hyperparameter_tag(suite.provenance())
    if record.models_fingerprint != fingerprint:
        return None, (f"it was measured on other models or data (fingerprint "
                      f"{record.models_fingerprint}; this cache's is {fingerprint}"
                      + ("" if suite.built() else ", whose models are not all built yet")
                      + ")")
    return record, None


def run(config: RunConfig) -> RunRecord:
    """Run one benchmark cell and return its record (read back when it exists already)."""
    return run_splits(config, [config.split])[0]


def run_splits(config: RunConfig, splits: list[str]) -> list[RunRecord]:
    """Run the cells of ``config``'s method on each of ``splits`` (records in that order, read
    back where they exist already), building the suite, measuring its references and loading
    its models once. Every merge is of the seen tasks whatever the split, so splits whose
    methods are equal once validation has chosen their per-task hyperparameters (all but
    TALL-Mask's seen split, whose lam is chosen per task) share one merge, timed and measured
    once: each record is the one a single run of its split writes. A later, different merge's
    peak memory starts from what the process holds then (the high-water mark is reset where
    Linux allows). A method not applicable on one split is recorded as such, the other splits
    run, and :class:`MethodNotApplicable` is raised at the end."""
    git_commit()                        # the code this process runs, before any long work
    records: dict[str, RunRecord] = {}
    not_applicable: list[MethodNotApplicable] = []
    todo: list[tuple[RunConfig, MergeMethod, str]] = []
    suite = None
    for split in dict.fromkeys(splits):
        cell = dataclasses.replace(config, split=split)
        suite, method, path = plan_cell(cell)
        try:
            stored = _stored_record(cell, suite, method, path)
        except MethodNotApplicable as reason:
            not_applicable.append(reason)
            continue
        if stored is not None:
            records[split] = stored
        else:
            todo.append((cell, method, path))
    if todo:
        torch.manual_seed(config.seed)
        suite = ensure_built(suite, config)
        suite.prepare(progress=not config.quiet)
        references = reference_scores(suite, config)
        seen = suite.split_tasks("seen")
        pretrained = suite.load_pretrained()
        finetuned = {task: suite.load_finetuned(task) for task in seen}
        last = None                     # (method, its merge or why not): the latest merge
        for cell, method, path in todo:
            if last is not None:
                torch.manual_seed(config.seed)          # as a single run of this split
            method = select_per_task(suite, method, pretrained, finetuned, cell)
            if last is None or last[0] != method:
                if last is not None:
                    last = None                         # release the earlier merge first
                    reset_peak_rss()
                last = (method, _merge(suite, method, pretrained, finetuned, cell, path))
            merge = last[1]
            if isinstance(merge, MethodNotApplicable):
                _record_not_applicable(suite, method, cell, path, merge)
                not_applicable.append(merge)
                continue
            records[cell.split] = _evaluate_and_record(suite, method, merge, references,
                                                       cell, path)
            if merge.resume is not None and all(c.split in records for c, *_ in todo):
                merge.resume.discard()
    if not_applicable:
        raise not_applicable[0]
    return [records[split] for split in dict.fromkeys(splits)]


def _stored_record(config: RunConfig, suite: Suite, method: MergeMethod,
                   path: str) -> RunRecord | None:
    """The cell's stored record when it can stand (``--force`` aside), else None; a stored
    "not applicable" raises :class:`MethodNotApplicable`."""
    if os.path.exists(path) and not config.force:
        record, problem = stored_result(path, suite)
        if record is not None:
            _log(config, f"result exists, skipped (use --force to rerun): {path}")
            if record.status == "not-applicable":
                raise MethodNotApplicable(f"{record.reason} (recorded in {path})")
            return record
        _log(config, f"the stored record {path} cannot be used ({problem}): running again")
    if config.force and os.path.exists(path):
        _log(config, f"--force: measuring {method.name} again over {path}"
                     + ("; the reference models too (--force-references)"
                        if config.force_references else
                        "; the reference models' stored scores are kept (--force-references "
                        "measures them again)"))
    return None


@dataclasses.dataclass
class _Merge:
    result: MergeResult
    seconds: float
    peak_rss: int
    peak_gpu: int | None
    resume: ResumeState | None = None      # discarded once the records are written


def resume_state(suite: Suite, method: MergeMethod, config: RunConfig, path: str
                 ) -> ResumeState | None:
    """Where a resumable merge keeps its progress: ``<cache>/resume/<suite>/<record name>-<tag
    of the suite's models>.safetensors`` (the merge is of the seen tasks: every split's record
    shares it), for the merge, models, method code and environment of this run only."""
    if not getattr(method, "resumable", False):
        return None
    suite_tag = hyperparameter_tag(suite.provenance())
    name = f"{os.path.splitext(os.path.basename(path))[0]}-{suite_tag}.safetensors"
    identity = {"method": method.name, "params": json_safe(method.params()),
                "suite": suite.name, "suite_tag": suite_tag, "seed": config.seed,
                "seen": suite.split_tasks("seen"), "device": config.device,
                "pinned": is_pinned(), "torch": torch.__version__,
                "code": sha256_file(inspect.getfile(type(method)))}    # the method's file
    return ResumeState(os.path.join(suite.cache_dir, "resume", suite.name, name),
                       hyperparameter_tag(identity))


def _merge(suite: Suite, method: MergeMethod, pretrained, finetuned, config: RunConfig,
           path: str) -> _Merge | MethodNotApplicable:
    """Merge the seen tasks (timed; peak memory read right after, before any evaluation)."""
    seen = suite.split_tasks("seen")
    _log(config, f"merging {len(seen)} tasks with {method.name}")
    gpu = config.device.startswith("cuda")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    resume = resume_state(suite, method, config, path)
    start = time.perf_counter()
    try:
        with (stream_outputs(stream_folder(config, suite, path)) if config.stream_dir
              else contextlib.nullcontext()), merge_device(config.device):
            data = ({"data": suite.task_inputs(seen, **method.data_request())}
                    if method.needs_data else {})
            if resume is not None:
                data["resume"] = resume
                _log(config, f"its progress is saved in {resume.path}")
            result = method.merge(pretrained, finetuned, progress=not config.quiet, **data)
        result.check_finite()
    except MethodNotApplicable as reason:
        return reason
    seconds = time.perf_counter() - start
    return _Merge(result, seconds, peak_rss_bytes(),
                  torch.cuda.max_memory_allocated() if gpu else None, resume)


def _record_not_applicable(suite: Suite, method: MergeMethod, config: RunConfig, path: str,
                           reason: MethodNotApplicable) -> None:
    """Recorded, so the leaderboard says why this method has no row here."""
    write_record(path, RunRecord(
        suite.name, config.split, method.name, row_label(method, suite), config.seed,
        json_safe(method.params()), status="not-applicable", reason=str(reason),
        suite_options=json_safe(suite.identity()) or None,
        provenance=run_provenance(suite, config.device)))


def _evaluate_and_record(suite: Suite, method: MergeMethod, merge: _Merge,
                         references: References, config: RunConfig, path: str) -> RunRecord:
    result = merge.result
    start = time.perf_counter()
    tasks, gammas, outcomes = evaluate_split(suite, result, config)
    eval_seconds = time.perf_counter() - start

    individual = {t: references.scores["individual"][t] for t in tasks}
    average = mean_score(tasks)
    individual_average = mean_score(individual)
    amr = result.amr()
    record = RunRecord(
        suite.name, config.split, method.name, row_label(method, suite), config.seed,
        json_safe(method.params()), suite_options=json_safe(suite.identity()) or None,
        suite_fingerprint=hyperparameter_tag(suite.provenance()),
        task_order=list(tasks), tasks=tasks, average=average,
        individual_average=individual_average, adr=adr(individual_average, average),
        amr=AmrFigures(amr, sum(amr.values()) / len(amr),
                       sum(result.amr("paper").values()) / len(amr)
                       if result.paper_bits is not None else None),
        stored_bytes_per_task={t: result.stored_bytes(t) for t in result.tasks},
        merged_params=result.merged_params, merge_info=json_safe(result.info),
        unseen_weighting=config.unseen_weighting if config.split == "unseen" else None,
        gamma=gammas, merge_seconds=merge.seconds, eval_seconds=eval_seconds,
        peak_rss_bytes=merge.peak_rss, peak_gpu_bytes=merge.peak_gpu,
        provenance=run_provenance(suite, config.device))
    known = outcomes if len(outcomes) == len(tasks) else None
    with_intervals(record, known, references.outcomes["individual"])
    return write_record(path, record, known)


def stream_folder(config: RunConfig, suite: Suite, record: str) -> str:
    """This run's own folder of streamed outputs, ``<stream-dir>/<suite>/<split>/<record
    name>``: runs of other methods, hyperparameters or seeds never write over each other."""
    name = os.path.splitext(os.path.basename(record))[0]
    return os.path.join(config.stream_dir, suite.name, config.split, name)


def evaluate_split(suite: Suite, result: MergeResult, config: RunConfig):
    """Metrics of every task of the split, the similarity weights used on unseen tasks, and the
    per-example outcomes the suite gave (task -> arrays)."""
    outcomes: dict[str, dict] = {}
    tasks: dict[str, TaskScore] = {}
    gammas: dict[str, dict[str, float]] = {}
    seen_embeddings: dict[str, object] = {}     # computed once, on the first weighted task
    for task in suite.split_tasks(config.split):
        if config.split == "seen":
            weights = result.weights_for(task)
        else:
            weighted = result.kind == "personalized" and (
                result.unseen.get("weighted") or config.unseen_weighting == "similarity")
            if weighted:
                undescribed = [t for t in (task, *result.tasks)
                               if not suite.task(t).description.strip()]
                if undescribed:
                    raise ValueError(
                        f"similarity weights need a description of every task; "
                        f"{', '.join(map(repr, undescribed))} of suite {suite.name!r} has none")
                if not seen_embeddings:
                    seen_embeddings = {seen: suite.task_embedding(seen) for seen in result.tasks}
                gammas[task] = similarity_weights(suite.task_embedding(task), seen_embeddings,
                                                  repr(task))
                weights = result.weights_for_unseen(gammas[task])
            else:
                weights = result.weights_for_unseen()
        evaluation = suite.evaluate(task, weights, device=config.device,
                                    progress=not config.quiet)
        tasks[task] = task_score(evaluation)
        if evaluation.outcomes is not None:
            outcomes[task] = evaluation.outcomes
        _log(config, f"  {task}: {tasks[task].metric} {tasks[task].value:.4f}")
    return tasks, gammas, outcomes


def row_label(method: MergeMethod, suite: Suite) -> str:
    """The method's name plus any hyperparameter that differs from its class default (not the
    seed: records of several seeds make one leaderboard row)."""
    defaults = {h.name: h.default for h in type(method).hyperparameters()}
    changed = {k: v for k, v in method.params().items()
               if v != defaults.get(k) and k != "seed"}
    suite_defaults = type(method).defaults_from(suite.defaults_for)
    shown = {k: v for k, v in changed.items() if suite_defaults.get(k) != v}
    if not shown:
        return method.name
    return f"{method.name} ({', '.join(f'{k}={_short(v)}' for k, v in sorted(shown.items()))})"


def _short(value) -> str:
    if isinstance(value, dict):
        return "per-task"
    return str(value)

"""Run records: one typed record per (suite, split, method, hyperparameters, seed), stored as
one JSON file.

:class:`RunRecord` is the only form the runner writes and the leaderboard and CLI read; its JSON
carries a schema version and follows the JSON Schema in ``run_record.schema.json`` beside this
module. Files are written atomically (a temporary file, then a rename), so an interrupted run
never leaves half a file and never damages earlier results. Reading never stops at a bad file:
each unusable one is skipped with its reason. Records of schema version 1 load as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from harness.io.files import UntrustedFileError, read_json_file, sha256_file, write_json_atomic

SCHEMA_VERSION = 1


def json_safe(value):
    """``value`` with tensors as lists and keys as strings: what a record's JSON can hold."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def hyperparameter_tag(hyperparameters: dict) -> str:
    """A short stable tag for a hyperparameter set (part of the file name)."""
    text = json.dumps(hyperparameters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def record_path(results_dir: str, suite: str, split: str, method: str, hyperparameters: dict,
                seed: int) -> str:
    name = f"{method}-{hyperparameter_tag(hyperparameters)}-seed{seed}.json"
    return os.path.join(results_dir, suite, split, name)


SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_record.schema.json")
MAX_RECORD_BYTES = 64 << 20
STATUSES = ("measured", "reference", "not-applicable", "failed")


class RecordError(ValueError):
    """A record file that is not a usable run record; the message says why."""


@dataclass
class TaskScore:
    """One task's score: the headline metric (a fraction in [0, 1], or a correlation) and
    extras, over ``examples`` test examples."""

    metric: str
    value: float
    extras: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    interval: list[float] | None = None      # 95% bootstrap interval [low, high]


@dataclass
class AmrFigures:
    """AMR in percent: per task, their mean, and the paper's count where a method has one."""

    per_task: dict[str, float]
    mean: float
    paper_mean: float | None = None


@dataclass
class RunRecord:
    """The outcome of one benchmark cell.

    ``status``: ``measured`` (a merge evaluated), ``reference`` (the pretrained or individual
    models, measured once per suite; ``suite_fingerprint`` says for which models and data) or
    ``not-applicable`` (the method's rule could not be met; ``reason`` says why, no scores) or
    ``failed`` (a sweep's cell that raised twice; ``reason`` holds the error, no scores).
    Scores are fractions; ``adr`` and AMR are in percent.
    """

    suite: str
    split: str
    method: str
    label: str
    seed: int = 0
    hyperparameters: dict = field(default_factory=dict)
    suite_options: dict | None = None     # the suite's identity: fine-tuning seed, user config
    status: str = "measured"
    reason: str | None = None
    task_order: list[str] = field(default_factory=list)
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    average: float | None = None
    average_interval: list[float] | None = None
    individual_average: float | None = None
    adr: float | None = None
    adr_interval: list[float] | None = None
    amr: AmrFigures | None = None
    stored_bytes_per_task: dict[str, int] | None = None
    merged_params: int | None = None
    merge_info: dict | None = None
    unseen_weighting: str | None = None
    gamma: dict[str, dict[str, float]] | None = None
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    suite_fingerprint: str | None = None
    outcomes: dict | None = None          # {"file": name beside the record, "sha256": ...}
    provenance: dict = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)   # the file read or written

    @property
    def measured(self) -> bool:
        return self.status not in ("not-applicable", "failed")

    @property
    def models_fingerprint(self) -> str | None:
        """A tag of the models and data the record was measured on (the suite's provenance:
        checkpoint hashes, recipe, data), or None where the record does not say."""
        if self.suite_fingerprint:
            return self.suite_fingerprint
        suite = self.provenance.get("suite") if isinstance(self.provenance, dict) else None
        return hyperparameter_tag(suite) if isinstance(suite, dict) else None

    @property
    def finetune_seed(self) -> int:
        """Which fine-tuning of the suite's task models the record used (0: the published)."""
        return (self.suite_options or {}).get("finetune_seed", 0)

    def to_json(self) -> dict:
        """The JSON object of the record (``path`` excluded; fields that are None left out)."""
        out = {"schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "path" or value is None:
                continue
            if f.name == "tasks":
                value = {t: {k: v for k, v in dataclasses.asdict(score).items()
                             if v is not None} for t, score in value.items()}
            elif f.name == "amr":
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data, path: str | None = None) -> RunRecord:
        """The record of a parsed JSON object; :class:`RecordError` says what is wrong."""
        problem = record_problem(data)
        if problem is not None:
            raise RecordError(problem)
        names = {f.name for f in dataclasses.fields(cls)} - {"path"}
        values = {k: v for k, v in data.items() if k in names}
        values["tasks"] = {t: TaskScore(s["metric"], s["value"], dict(s.get("extras") or {}),
                                        s.get("examples", 0), s.get("interval"))
                           for t, s in data["tasks"].items()}
        amr = data.get("amr")
        values["amr"] = None if amr is None else AmrFigures(
            dict(amr.get("per_task") or {}), amr["mean"], amr.get("paper_mean"))
        values.setdefault("task_order", list(data["tasks"]))
        if "status" not in data and data["method"] in ("pretrained", "individual"):
            values["status"] = "reference"            # schema version 1 had no status there
        return cls(**values, path=path)


def write_record(path: str, record: RunRecord,
                 outcomes: Mapping[str, Mapping[str, Tensor]] | None = None) -> RunRecord:
    """Write ``record`` to ``path`` atomically, and first its per-example ``outcomes`` (task ->
    arrays) beside it (``<name>.outcomes.safetensors``, named in the record with its sha256);
    returns the record with its path set."""
    if outcomes:
        from safetensors.torch import save_file

        name = os.path.basename(path)[:-len(".json")] + OUTCOMES_SUFFIX
        target = os.path.join(os.path.dirname(path), name)
        tensors = {f"{task}::{kind}": torch.as_tensor(array).contiguous()
                   for task, arrays in outcomes.items() for kind, array in arrays.items()}
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        descriptor, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors",
                                           dir=os.path.dirname(os.path.abspath(target)))
        os.close(descriptor)
        try:
            save_file(tensors, tmp, metadata={"format": "merge-harness-outcomes"})
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        record.outcomes = {"file": name, "sha256": sha256_file(target)}
    write_json_atomic(path, record.to_json())
    record.path = path
    return record


OUTCOMES_SUFFIX = ".outcomes.safetensors"


def read_outcomes(record: RunRecord) -> tuple[dict[str, dict[str, Tensor]] | None, str]:
    """(task -> per-example arrays, "") of a record, or (None, why they are unavailable): an
    older record has none; a file that is missing or does not match its checksum is not used."""
    if not record.outcomes or not record.path:
        return None, "the record stores no per-example outcomes"
    name = record.outcomes.get("file")
    if not isinstance(name, str) or os.path.basename(name) != name:
        return None, f"{record.path}: its outcomes file name {name!r} is not a plain name"
    path = os.path.join(os.path.dirname(record.path), name)
    try:
        if sha256_file(path) != record.outcomes.get("sha256"):
            return None, f"{path} does not match its checksum"
        from safetensors.torch import load_file

        tensors = load_file(path)
    except Exception as error:          # missing, unreadable, not safetensors
        return None, f"{path} cannot be read ({type(error).__name__}: {error})"
    out: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        task, _, kind = key.rpartition("::")
        out.setdefault(task, {})[kind] = tensor
    if set(out) != set(record.tasks) or any(
            len(t) != record.tasks[task].examples and record.tasks[task].examples
            for task, arrays in out.items() for t in arrays.values()):
        return None, f"{path} does not hold one outcome per test example of every task"
    return out, ""


@dataclass
class Skipped:
    path: str
    reason: str


def record_problem(record) -> str | None:
    """Why ``record`` (parsed JSON) is not a usable run record, or None when it is."""
    if not isinstance(record, dict):
        return f"holds a JSON {type(record).__name__}, not a record"
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        return f"schema version {version!r}, this harness reads {SCHEMA_VERSION}"
    for name, kinds in (("suite", str), ("split", str), ("method", str), ("label", str),
                        ("tasks", dict)):
        if not isinstance(record.get(name), kinds):
            return f"field {name!r} is missing or not a {kinds.__name__}"
    if record["split"] not in ("seen", "unseen"):
        return f"split {record['split']!r} is neither seen nor unseen"
    if record.get("status", "measured") not in STATUSES:
        return f"status {record['status']!r} is not one of {', '.join(STATUSES)}"
    seed = record.get("seed", 0)
    if type(seed) is not int:
        return f"seed {seed!r} is not an integer"
    if not isinstance(record.get("hyperparameters", {}), dict):
        return "hyperparameters is not an object"
    if not isinstance(record.get("suite_options") or {}, dict):
        return "suite_options is not an object"
    if type((record.get("suite_options") or {}).get("finetune_seed", 0)) is not int:
        return "suite_options.finetune_seed is not an integer"
    if record.get("status") in ("not-applicable", "failed"):
        return None if isinstance(record.get("reason"), str) else "no reason is given"
    for task, score in record["tasks"].items():
        if not isinstance(score, dict) or not isinstance(score.get("metric"), str) \
                or not _number(score.get("value")):
            return f"task {task!r} has no metric name and numeric value"
    if not _number(record.get("average")):
        return "average is not a number"
    for name in ("adr", "individual_average"):
        if record.get(name) is not None and not _number(record[name]):
            return f"{name} is not a number"
    amr = record.get("amr")
    if amr is not None and (not isinstance(amr, dict) or not _number(amr.get("mean"))):
        return "amr has no numeric mean"
    order = record.get("task_order", list(record["tasks"]))
    if not isinstance(order, list) or any(t not in record["tasks"] for t in order):
        return "task_order names tasks it does not score"
    return None


def _number(value) -> bool:
    return type(value) in (int, float)


def read_record(path: str) -> tuple[RunRecord | None, str | None]:
    """(record, None) for a usable record file, else (None, why not)."""
    try:
        data = read_json_file(path, "result record", MAX_RECORD_BYTES)
    except (OSError, UntrustedFileError) as error:
        return None, f"does not parse: {error}"
    try:
        return RunRecord.from_json(data, path), None
    except RecordError as error:
        return None, str(error)


def read_records(results_dir: str) -> tuple[list[RunRecord], list[Skipped]]:
    """Every usable record under ``results_dir`` (sorted by path), and the files skipped, each
    with its reason: one bad file never stops a leaderboard or a run."""
    records, skipped = [], []
    for folder, _, files in sorted(os.walk(results_dir)):
        for name in sorted(files):
            if not name.endswith(".json") or name.startswith(".tmp"):
                continue
            path = os.path.join(folder, name)
            record, problem = read_record(path)
            if record is None:
                skipped.append(Skipped(path, problem))
            else:
                records.append(record)
    return records, skipped

"""Result records: one JSON file per (suite, split, method, hyperparameters, seed).

Plain JSON with a schema version; written atomically (a temporary file, then a rename), so an
interrupted run never leaves half a file and never damages earlier results. The leaderboard reads
these records and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from harness.io.files import UntrustedFileError, read_json_file, write_json_atomic

SCHEMA_VERSION = 1
DEFAULT_RESULTS_DIR = os.path.join("leaderboards", "results")


def hyperparameter_tag(hyperparameters: dict) -> str:
    """A short stable tag for a hyperparameter set (part of the file name)."""
    text = json.dumps(hyperparameters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def record_path(results_dir: str, suite: str, split: str, method: str, hyperparameters: dict,
                seed: int) -> str:
    name = f"{method}-{hyperparameter_tag(hyperparameters)}-seed{seed}.json"
    return os.path.join(results_dir, suite, split, name)


def write_record(path: str, record: dict) -> None:
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION, **record})


@dataclass
class Skipped:
    path: str
    reason: str


MAX_RECORD_BYTES = 64 << 20


def record_problem(record) -> str | None:
    """Why ``record`` (parsed JSON) is not a usable result record, or None when it is."""
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
    seed = record.get("seed", 0)
    if type(seed) is not int:
        return f"seed {seed!r} is not an integer"
    if record.get("status") == "not-applicable":
        return None if isinstance(record.get("reason"), str) else "no reason is given"
    for task, score in record["tasks"].items():
        if not isinstance(score, dict) or not isinstance(score.get("metric"), str) \
                or not _number(score.get("value")):
            return f"task {task!r} has no metric name and numeric value"
    if not _number(record.get("average")):
        return "average is not a number"
    for name in ("adr",):
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


def read_record(path: str) -> tuple[dict | None, str | None]:
    """(record, None) for a usable record file, else (None, why not)."""
    try:
        record = read_json_file(path, "result record", MAX_RECORD_BYTES)
    except (OSError, UntrustedFileError) as error:
        return None, f"does not parse: {error}"
    problem = record_problem(record)
    if problem is not None:
        return None, problem
    record["_path"] = path
    return record, None


def read_records(results_dir: str) -> tuple[list[dict], list[Skipped]]:
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

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

from harness.files import write_json_atomic

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


def read_records(results_dir: str) -> tuple[list[dict], list[Skipped]]:
    """Every record under ``results_dir`` (sorted by path), and the files that were skipped."""
    records, skipped = [], []
    for folder, _, files in sorted(os.walk(results_dir)):
        for name in sorted(files):
            if not name.endswith(".json") or name.startswith(".tmp"):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                skipped.append(Skipped(path, f"does not parse: {exc}"))
                continue
            version = record.get("schema_version") if isinstance(record, dict) else None
            if version != SCHEMA_VERSION:
                skipped.append(Skipped(path, f"schema version {version!r}, this harness reads "
                                             f"{SCHEMA_VERSION}"))
                continue
            record["_path"] = path
            records.append(record)
    return records, skipped

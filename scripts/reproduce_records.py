"""Rebuild a suite from scratch and rerun methods reproducibly; fail when a record differs from
the checked-in one.

    python scripts/reproduce_records.py --suite tiny --methods ties dts-d
    python scripts/reproduce_records.py --suite offline-text --methods ties emr --sweep \
        --cache-dir ~/.cache/merge-harness

Builds the suite in a fresh cache (pinned, as every harness build; ``--cache-dir``: models built
before), runs each method on both splits with ``harness run --reproducible`` (``--sweep``: one
``harness sweep --reproducible``, whose jobs merge once for both splits in processes forked from
a preloaded worker) into a fresh results folder, and compares every record
it wrote (the methods' and the pretrained and individual models') with the record of the same
name under ``--against`` (default ``leaderboards/results``): the checkpoints' sha256, every
task's metric, interval and example count, the average, ADR and AMR with their intervals, the
stored bytes and merged parameters, and the per-example outcomes' sha256. Times, dates and the
machine are not compared. Prints each difference and exits 1 if there is one. CI runs it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from harness.bench.records import read_record

COMPARED = ("task_order", "tasks", "average", "average_interval", "individual_average", "adr",
            "adr_interval", "amr", "stored_bytes_per_task", "merged_params", "merge_info",
            "gamma", "status", "reason", "hyperparameters", "label")


def compare(produced: str, checked_in: str) -> list[str]:
    """The differences between two record files (empty when they agree)."""
    new, problem = read_record(produced)
    if new is None:
        return [f"{produced}: {problem}"]
    old, problem = read_record(checked_in)
    if old is None:
        return [f"{checked_in}: {problem} (the produced record has no checked-in counterpart)"]
    out = []
    for name in COMPARED:
        a, b = getattr(new, name), getattr(old, name)
        if a != b:
            out.append(f"{os.path.basename(checked_in)}: {name} is {_short(a)}, checked in "
                       f"{_short(b)}")
    a = new.provenance.get("suite", {}).get("checkpoints")
    b = old.provenance.get("suite", {}).get("checkpoints")
    if a != b:
        out.append(f"{os.path.basename(checked_in)}: the checkpoints' sha256 differ: {_short(a)} "
                   f"against {_short(b)}")
    if (new.outcomes or {}).get("sha256") != (old.outcomes or {}).get("sha256"):
        out.append(f"{os.path.basename(checked_in)}: the per-example outcomes differ")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 160 else text[:157] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="tiny")
    parser.add_argument("--methods", nargs="+", default=["ties", "dts-d"])
    parser.add_argument("--splits", nargs="+", default=["seen", "unseen"])
    parser.add_argument("--against", default=os.path.join("leaderboards", "results"))
    parser.add_argument("--cache-dir", default=None,
                        help="models built before (default: a fresh cache, built here)")
    parser.add_argument("--sweep", action="store_true",
                        help="run every cell through one `harness sweep --reproducible`")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "MERGE_HARNESS_UNPINNED_BUILDS"}
    differences = []
    with tempfile.TemporaryDirectory(prefix="reproduce-") as work:
        results = os.path.join(work, "results")
        cache = os.path.expanduser(args.cache_dir) if args.cache_dir else os.path.join(
            work, "cache")
        if args.sweep:
            runs = [("sweep", ["sweep", "--reproducible", "--suite", args.suite, "--methods",
                               ",".join(args.methods), "--splits", ",".join(args.splits),
                               "--results", results, "--cache-dir", cache])]
        else:
            runs = [(f"{method} {split}", ["run", "--reproducible", "--quiet", "--suite",
                                           args.suite, "--method", method, "--split", split,
                                           "--results", results, "--cache-dir", cache])
                    for method in args.methods for split in args.splits]
        for what, argv in runs:
            child = subprocess.run([sys.executable, "-m", "harness.bench.cli", *argv],
                                   env=env, capture_output=True, text=True)
            if child.returncode != 0:
                differences.append(f"{what}: harness {argv[0]} failed: "
                                   f"{(child.stderr or child.stdout).strip().splitlines()[-1:]}")
        for folder, _, files in sorted(os.walk(results)):
            for name in sorted(f for f in files if f.endswith(".json")):
                produced = os.path.join(folder, name)
                relative = os.path.relpath(produced, results)
                differences += compare(produced, os.path.join(args.against, relative))
    for line in differences:
        print(line, file=sys.stderr)
    print(f"{'FAILED' if differences else 'ok'}: {args.suite} rebuilt and rerun "
          f"({', '.join(args.methods)} on {', '.join(args.splits)})"
          + (f", {len(differences)} difference(s)" if differences else ", every record the same"))
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())

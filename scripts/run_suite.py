"""Maintainers: rerun the checked-in records of suites and render their leaderboards, through
``harness sweep`` (every method, both splits, into ``leaderboards/results/`` by default).

    python scripts/run_suite.py --suite tiny            # cells without a record
    python scripts/run_suite.py --suite tiny --reproducible --force   # tiny's checked-in records
    python scripts/run_suite.py --suite tiny offline-text offline-vision   # every checked-in one
    python scripts/run_suite.py --suite offline-text --reproducible --finetune-seed 1

Each cell is a plain ``harness run`` in its own process (so each record's peak memory is that
run's alone); ``--reproducible`` runs every cell in the pinned environment, as CI's check of
tiny's records does (``scripts/reproduce_records.py``).
"""

from __future__ import annotations

import argparse
import sys

from harness.bench.cli import main as harness
from harness.core.defaults import CHECKED_IN_RESULTS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, nargs="+")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--splits", nargs="*", default=["seen", "unseen"])
    parser.add_argument("--results", default=CHECKED_IN_RESULTS,
                        help="default: the checked-in results (a maintainer's command)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--workers", default=None, help="cells at once (default: harness sweep's)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--reproducible", action="store_true")
    parser.add_argument("--finetune-seed", type=int, default=0,
                        help="the task models of another fine-tuning seed (built first)")
    args = parser.parse_args()
    argv = ["sweep", "--suite", ",".join(args.suite),
            "--methods", ",".join(args.methods) if args.methods else "all",
            "--splits", ",".join(args.splits), "--results", args.results]
    argv += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    argv += ["--workers", args.workers] if args.workers else []
    argv += ["--finetune-seed", str(args.finetune_seed)] if args.finetune_seed else []
    argv += ["--force"] if args.force else []
    argv += ["--reproducible"] if args.reproducible else []
    return harness(argv)


if __name__ == "__main__":
    sys.exit(main())

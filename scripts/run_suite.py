"""Run every registered method on both splits of suites, then regenerate their leaderboards.

    python scripts/run_suite.py --suite tiny            # results in leaderboards/results/tiny/
    python scripts/run_suite.py --suite tiny --force    # rerun what already has a result
    python scripts/run_suite.py --suite tiny offline-text offline-vision   # every checked-in one
    python scripts/run_suite.py --suite tiny --reproducible --force   # tiny's checked-in records
    python scripts/run_suite.py --suite offline-text --reproducible --finetune-seed 1

Each run is a plain ``harness run`` in its own process (so each record's peak memory is that
run's alone); results already present are kept unless --force. ``--reproducible`` runs every
cell in the pinned environment, as CI's check of tiny's records does
(``scripts/reproduce_records.py``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from harness import list_methods
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
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--reproducible", action="store_true")
    parser.add_argument("--finetune-seed", type=int, default=0,
                        help="the task models of another fine-tuning seed (built first)")
    args = parser.parse_args()
    failed = []
    for suite in args.suite:
        for method in args.methods or list_methods():
            for split in args.splits:
                start = time.perf_counter()
                argv = ["run", "--method", method, "--suite", suite, "--split", split,
                        "--results", args.results, "--quiet"]
                argv += ["--force"] if args.force else []
                argv += ["--reproducible"] if args.reproducible else []
                argv += ["--cache-dir", args.cache_dir] if args.cache_dir else []
                argv += ["--finetune-seed", str(args.finetune_seed)] if args.finetune_seed else []
                code = subprocess.run([sys.executable, "-m", "harness.bench.cli", *argv]).returncode
                print(f"{suite} {method} {split}: exit {code} "
                      f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
                if code:
                    failed.append(f"{suite}/{method}/{split}")
        harness(["leaderboard", "--suite", suite, "--results", args.results,
                 "--out", os.path.dirname(os.path.abspath(args.results))])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Time a whole leaderboard through ``harness sweep``: every cell of a suite's grid, into a
fresh results folder, with the suite's models already cached.

    python scripts/bench_sweep.py --suite offline-text           # the paper's 12 methods, 24 cells
    python scripts/bench_sweep.py --suite offline-text --harness /path/to/other/checkout

Prints the wall time of the sweep (reference models measured once, then every cell), the time
of each job as the sweep reported it, and the processes' summed CPU time. ``--harness`` times
another checkout's code (run from its root, which is put first on ``PYTHONPATH``): the
before-and-after figure of a change. Run it on a quiet machine; the figures are in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

PAPER_METHODS = ("weight-averaging", "task-arithmetic", "ties", "dare", "emr", "tall-mask",
                 "t-switch", "svd", "dts-t", "dts-t-star", "dts-d", "dts-d-star")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="offline-text")
    parser.add_argument("--methods", default=",".join(PAPER_METHODS),
                        help="default: the paper's twelve")
    parser.add_argument("--splits", default="seen,unseen")
    parser.add_argument("--cache-dir", default=None, help="where the suite's models are cached")
    parser.add_argument("--workers", default=None)
    parser.add_argument("--reproducible", action="store_true")
    parser.add_argument("--harness", default=None, metavar="CHECKOUT",
                        help="run this checkout's code instead of the installed one")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="write the results here (kept) instead of a temporary folder")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.harness:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(args.harness),
                                                          env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as work:
        results = os.path.abspath(args.keep) if args.keep else os.path.join(work, "results")
        cache = os.path.abspath(os.path.expanduser(args.cache_dir)) if args.cache_dir else None
        argv = [sys.executable, "-m", "harness.bench.cli", "sweep", "--suite", args.suite,
                "--methods", args.methods, "--splits", args.splits, "--results", results]
        argv += ["--cache-dir", cache] if cache else []
        argv += ["--workers", args.workers] if args.workers else []
        argv += ["--reproducible"] if args.reproducible else []
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        child = subprocess.run(argv, env=env, capture_output=True, text=True,
                               cwd=os.path.abspath(args.harness) if args.harness else None)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(child.stdout, end="")
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr, end="")
        return child.returncode
    cells = len(re.findall(r"^\[\d+/\d+\] done", child.stdout, re.M))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"\n{args.suite}: {cells} cells in {wall:.0f} s wall ({wall / 60:.1f} min), "
          f"{cpu:.0f} s CPU in all processes, on {os.cpu_count()} cores"
          + (f", code of {args.harness}" if args.harness else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

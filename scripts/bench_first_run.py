"""Time a suite's first `harness run` on an empty cache, then a later run with cached models.

    python scripts/bench_first_run.py                      # offline-text, dts-d
    python scripts/bench_first_run.py --suite offline-vision --method ties
    python scripts/bench_first_run.py --reuse-downloads    # skip the one-time data fetch
    python scripts/bench_first_run.py --suite offline-llm --method task-arithmetic \
        --reuse-downloads --keep-cache ~/llm-cache          # keep what the first run built
    python scripts/bench_first_run.py --suite offline-llm-cls --reproducible ...  # pinned runs

The first run fetches the data (unless --reuse-downloads links the existing downloads folder),
fine-tunes every task model, measures the individual and pretrained models and runs the method;
the second run reuses the cache and the first run's reference scores (a copy of its results
folder without the method's records) and only merges and evaluates, as a sweep's later cells do.
Each is a fresh `harness run` process. Prints wall times and the cache's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from harness.tasks.base import default_cache_dir


def timed_run(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "harness.bench.cli", *argv], env=env, check=True)
    return time.perf_counter() - start


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
               for f in files if not os.path.islink(os.path.join(d, f)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="offline-text")
    parser.add_argument("--method", default="dts-d")
    parser.add_argument("--reuse-downloads", action="store_true",
                        help="link the existing cache's downloads/ instead of fetching again")
    parser.add_argument("--keep-cache", metavar="DIR",
                        help="build into DIR (new or empty) and keep it, instead of a "
                             "temporary cache")
    parser.add_argument("--reproducible", action="store_true",
                        help="both runs pinned (`harness run --reproducible`), so that a kept "
                             "cache holds the task models a pinned sweep reuses")
    args = parser.parse_args()
    if args.keep_cache and os.path.isdir(args.keep_cache) and os.listdir(args.keep_cache):
        parser.error(f"--keep-cache {args.keep_cache}: not empty (the first run must start "
                     "from an empty cache)")
    with tempfile.TemporaryDirectory(prefix="merge-harness-bench-") as root:
        cache = os.path.abspath(args.keep_cache) if args.keep_cache else \
            os.path.join(root, "cache")
        os.makedirs(cache, exist_ok=True)
        downloads = os.path.join(default_cache_dir(), "downloads")
        if args.reuse_downloads and os.path.isdir(downloads):
            os.symlink(downloads, os.path.join(cache, "downloads"))
        env = {**os.environ, "MERGE_HARNESS_CACHE": cache}
        base = ["run", "--method", args.method, "--suite", args.suite, "--quiet",
                *(["--reproducible"] if args.reproducible else [])]
        first = timed_run([*base, "--results", os.path.join(root, "r1")], env)
        print(f"first run: {first:.1f} s", flush=True)    # before the second, which may be cut
        # the later run: a cell as a sweep runs it, the reference scores already stored
        shutil.copytree(os.path.join(root, "r1"), os.path.join(root, "r2"),
                        ignore=lambda folder, names: [n for n in names
                                                      if n.startswith(f"{args.method}-")])
        later = timed_run([*base, "--results", os.path.join(root, "r2")], env)
        print(f"# {args.suite}, {args.method}, {os.cpu_count()} CPUs"
              + (" (downloads reused)" if args.reuse_downloads else "")
              + (", pinned" if args.reproducible else ""))
        print(f"first run (empty cache): {first:.1f} s ({first / 60:.1f} min)")
        print(f"later run (cached models and reference scores): {later:.1f} s")
        print(f"cache size: {folder_bytes(cache) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

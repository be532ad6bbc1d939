"""Build a suite under settings that imitate other machines and compare the bytes it makes.

    python scripts/check_reproducible.py --suite tiny                  # pinned builds
    python scripts/check_reproducible.py --suite tiny --unpinned       # the same, unpinned
    python scripts/check_reproducible.py --threads 1 2 4 --capabilities default avx2 avx512

Each setting builds the suite from scratch in a fresh cache, in a child process whose
environment imitates another machine: its thread count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``
and a CPU affinity of that many cores where there are), the vector width ATen picks
(``ATEN_CPU_CAPABILITY``) and MKL's code path (``MKL_ENABLE_INSTRUCTIONS``). A pinned build
(``python -m harness.bench.build``) then overrides all of them; ``--unpinned`` builds in the
imitated environment as it is, to show what pinning removes. Prints, per setting, the build
time and a digest of every cache entry's sha256, then whether all settings agree; exits 1 if
pinned builds differ.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time


def build(suite: str, cache: str, threads: int, capability: str, mkl: str,
          pinned: bool) -> tuple[float, dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "ATEN_CPU_CAPABILITY": capability}
    env.pop("MERGE_HARNESS_PINNED", None)
    if mkl != "native":
        env["MKL_ENABLE_INSTRUCTIONS"] = mkl
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    prefix = (["taskset", "-c", ",".join(map(str, cores[:threads]))]
              if cores and threads <= len(cores) and _has("taskset") else [])
    if pinned:
        argv = [sys.executable, "-m", "harness.bench.build", "--suite", suite, "--cache-dir",
                cache, "--quiet"]
    else:
        code = ("import sys; from harness.bench.runner import get_suite; "
                "get_suite(sys.argv[1], sys.argv[2]).prepare(progress=False)")
        argv = [sys.executable, "-c", code, suite, cache]
    start = time.perf_counter()
    subprocess.run(prefix + argv, env=env, check=True)
    seconds = time.perf_counter() - start
    entries = {}
    for folder, _, files in os.walk(cache):
        if "manifest.json" in files:
            with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
                entries.update({k: v["sha256"] for k, v in json.load(f)["entries"].items()})
    return seconds, entries


def _has(command: str) -> bool:
    return any(os.access(os.path.join(p, command), os.X_OK)
               for p in os.environ.get("PATH", "").split(os.pathsep))


def digest(entries: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="tiny")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2", "avx512"])
    parser.add_argument("--mkl", nargs="+", default=["native", "AVX2"],
                        help="MKL code paths (MKL_ENABLE_INSTRUCTIONS; native = unset)")
    parser.add_argument("--unpinned", action="store_true")
    args = parser.parse_args()
    pinned = not args.unpinned
    print(f"{args.suite}, {'pinned' if pinned else 'unpinned'} builds, {os.cpu_count()} cores")
    print("| threads | ATEN_CPU_CAPABILITY | MKL path | build s | entries | digest |")
    print("|---:|---|---|---:|---:|---|")
    digests = {}
    for threads, capability, mkl in itertools.product(args.threads, args.capabilities, args.mkl):
        with tempfile.TemporaryDirectory(prefix="reproducible-") as cache:
            seconds, entries = build(args.suite, cache, threads, capability, mkl, pinned)
        digests[(threads, capability, mkl)] = digest(entries)
        print(f"| {threads} | {capability} | {mkl} | {seconds:.1f} | {len(entries)} | "
              f"{digests[(threads, capability, mkl)]} |", flush=True)
    distinct = len(set(digests.values()))
    print(f"{distinct} distinct result(s) over {len(digests)} settings")
    return 1 if pinned and distinct > 1 else 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a suite under settings that imitate other machines and compare the bytes it makes.

    python scripts/check_reproducible.py --suite tiny                  # pinned builds
    python scripts/check_reproducible.py --suite tiny --unpinned       # the same, unpinned
    python scripts/check_reproducible.py --threads 1 2 4 --capabilities default avx2 avx512
    python scripts/check_reproducible.py --runs ties dts-d        # evaluation, not builds

Each setting builds the suite from scratch in a fresh cache, in a child process whose
environment imitates another machine: its thread count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``
and a CPU affinity of that many cores where there are), the vector width ATen picks
(``ATEN_CPU_CAPABILITY``) and MKL's code path (``MKL_ENABLE_INSTRUCTIONS``). A pinned build
(``python -m harness.bench.build``) then overrides all of them; ``--unpinned`` builds in the
imitated environment as it is, to show what pinning removes. Prints, per setting, the build
time and a digest of every cache entry's sha256, then whether all settings agree; exits 1 if
pinned builds differ.

With ``--runs METHOD ...`` the suite is built once (pinned) and each method is run on it in
every setting (``harness run``, both splits; ``--reproducible`` unless ``--unpinned``): the
digest is then of every record's figures (each task's value and interval, average, ADR) and the
per-example outcomes.
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


def run_cells(suite: str, cache: str, results: str, methods: list[str], threads: int,
              capability: str, mkl: str, pinned: bool) -> tuple[float, dict[str, str]]:
    """Run ``methods`` on both splits in an imitated environment; (seconds, record figures)."""
    from harness.bench.records import read_records

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "ATEN_CPU_CAPABILITY": capability, "MERGE_HARNESS_UNPINNED_BUILDS": "0"}
    env.pop("MERGE_HARNESS_PINNED", None)
    if mkl != "native":
        env["MKL_ENABLE_INSTRUCTIONS"] = mkl
    start = time.perf_counter()
    for method in methods:
        for split in ("seen", "unseen"):
            argv = ["run", "--quiet", "--suite", suite, "--method", method, "--split", split,
                    "--cache-dir", cache, "--results", results, "--force"]
            argv += [] if not pinned else ["--reproducible"]
            subprocess.run([sys.executable, "-m", "harness.bench.cli", *argv], env=env,
                           check=True, capture_output=True)
    figures = {}
    for r in read_records(results)[0]:
        figures[os.path.relpath(r.path, results)] = json.dumps(
            [{t: [s.value, s.interval] for t, s in r.tasks.items()}, r.average, r.adr,
             (r.outcomes or {}).get("sha256")], sort_keys=True)
    return time.perf_counter() - start, figures


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
    parser.add_argument("--runs", nargs="*", default=None, metavar="METHOD")
    args = parser.parse_args()
    pinned = not args.unpinned
    what = f"runs of {', '.join(args.runs)}" if args.runs else "builds"
    print(f"{args.suite}, {'pinned' if pinned else 'unpinned'} {what}, {os.cpu_count()} cores")
    print("| threads | ATEN_CPU_CAPABILITY | MKL path | seconds | entries | digest |")
    print("|---:|---|---|---:|---:|---|")
    digests = {}
    shared = tempfile.TemporaryDirectory(prefix="reproducible-cache-") if args.runs else None
    if shared is not None:
        build(args.suite, shared.name, 1, "default", "native", True)
    for threads, capability, mkl in itertools.product(args.threads, args.capabilities, args.mkl):
        with tempfile.TemporaryDirectory(prefix="reproducible-") as folder:
            if args.runs:
                seconds, entries = run_cells(args.suite, shared.name, folder, args.runs,
                                             threads, capability, mkl, pinned)
            else:
                seconds, entries = build(args.suite, folder, threads, capability, mkl, pinned)
        digests[(threads, capability, mkl)] = digest(entries)
        print(f"| {threads} | {capability} | {mkl} | {seconds:.1f} | {len(entries)} | "
              f"{digests[(threads, capability, mkl)]} |", flush=True)
    if shared is not None:
        shared.cleanup()
    distinct = len(set(digests.values()))
    print(f"{distinct} distinct result(s) over {len(digests)} settings")
    return 1 if pinned and distinct > 1 else 0


if __name__ == "__main__":
    sys.exit(main())

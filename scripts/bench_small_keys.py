"""A model of many small keys: every method's merge time against Task Arithmetic's, so a fixed
cost per key (a histogram, a buffer, a launch) shows as a ratio far above 1.

    python scripts/bench_small_keys.py [--keys 2000] [--entries 4] [--tasks 3] [--repeat 3]
        [--methods task-arithmetic ties ...]

Prints, per method, the median and range of ``--repeat`` in-memory merges (runs interleaved).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness import get_method


def models(keys: int, entries: int, tasks: int):
    g = torch.Generator().manual_seed(0)
    pretrained = {f"layer.{i}.weight": torch.randn(entries, generator=g) for i in range(keys)}
    finetuned = {f"task{t}": {k: v + 0.01 * torch.randn(entries, generator=g)
                              for k, v in pretrained.items()} for t in range(tasks)}
    return pretrained, finetuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--entries", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["task-arithmetic", "ties", "dare",
                                                           "emr", "tall-mask", "t-switch"])
    args = parser.parse_args()
    pretrained, finetuned = models(args.keys, args.entries, args.tasks)
    methods = ["task-arithmetic", *[m for m in args.methods if m != "task-arithmetic"]]
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeat):
        for name in methods:
            method = get_method(name)
            start = time.perf_counter()
            method.merge(pretrained, finetuned)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["task-arithmetic"])
    print(f"{args.keys} keys x {args.entries} entries, {args.tasks} tasks, "
          f"{torch.get_num_threads()} threads; medians of {args.repeat}")
    for name in methods:
        median = statistics.median(times[name])
        print(f"{name:16s} {median:7.3f} s ({min(times[name]):.3f}-{max(times[name]):.3f})  "
              f"{median / base:5.2f}x task-arithmetic")


if __name__ == "__main__":
    main()

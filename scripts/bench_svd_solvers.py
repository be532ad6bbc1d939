"""DTS-D's ``svd_solver`` choices compared: merge time and what each stores against exact.

On the CLIP ViT-B/32-shaped models of ``scripts/bench_methods.py`` (synthesized into ``--dir``
unless there), merges DTS-D (or ``--method``) with every solver in this process, in rounds
(``--repeat``: median seconds with their range), then for every task compares what is served:

* ``vs exact``: ``||D_s - D_exact|| / ||D_exact||`` over all keys, where ``D`` is the decoded
  stored delta (after thresholding, what serves the task);
* ``reconstruction``: ``||D_s - (theta_t - base)|| / ||theta_t - base||``, beside the same for
  exact: how much worse a solver makes the payload.

    python scripts/bench_svd_solvers.py --dir /tmp/vit-b32 --repeat 3
    python scripts/bench_svd_solvers.py --dir /tmp/vit-b32 --tasks 2 --method dts-t
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def served_delta(result, task: str) -> dict:
    """The decoded delta that serves ``task`` (float32), key by key."""
    weights = result.weights_for(task)
    return {k: weights[k].float() - result.base[k].float() for k in weights}


def relative(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over every key together."""
    num = sum(float((a[k] - b[k]).double().square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5 if den else 0.0


def main() -> None:
    from bench_methods import synthesize

    from harness import LazyStateDict, get_method
    from harness.methods.dts import SVD_SOLVERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="the models (synthesized if absent)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--method", default="dts-d")
    parser.add_argument("--solvers", nargs="+", default=list(SVD_SOLVERS))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if not os.path.exists(os.path.join(args.dir, f"task{args.tasks - 1}.safetensors")):
        synthesize(args.dir, args.tasks)
    pretrained = LazyStateDict(os.path.join(args.dir, "pretrained.safetensors"))
    finetuned = {f"task{t}": LazyStateDict(os.path.join(args.dir, f"task{t}.safetensors"))
                 for t in range(args.tasks)}
    print(f"# {platform.node()}: {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; {args.method}, CLIP ViT-B/32 vision tower x "
          f"{args.tasks} tasks, inputs memory-mapped")
    seconds: dict[str, list[float]] = {s: [] for s in args.solvers}
    results = {}
    for round_ in range(args.repeat):
        for solver in args.solvers:
            method = get_method(args.method, svd_solver=solver)
            start = time.perf_counter()
            results[solver] = method.merge(pretrained, finetuned)
            seconds[solver].append(time.perf_counter() - start)
            print(f"# round {round_ + 1}/{args.repeat}: {solver} {seconds[solver][-1]:.1f} s",
                  flush=True)
    exact = results.get("exact") or get_method(args.method).merge(pretrained, finetuned)
    print("| solver | merge s (median, range) | vs exact: max over tasks | reconstruction: "
          "mean over tasks (exact's) | AMR % |")
    print("|---|---:|---:|---:|---:|")
    for solver in args.solvers:
        result, vs_exact, recon, recon_exact = results[solver], [], [], []
        for task in result.tasks:
            mine, theirs = served_delta(result, task), served_delta(exact, task)
            true = {k: finetuned[task][k].float() - result.base[k].float() for k in mine}
            vs_exact.append(relative(mine, theirs))
            recon.append(relative(mine, true))
            recon_exact.append(relative(theirs, true))
        runs = seconds[solver]
        spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
        print(f"| {solver} | {statistics.median(runs):.1f}{spread} | {max(vs_exact):.2e} | "
              f"{statistics.mean(recon):.4f} ({statistics.mean(recon_exact):.4f}) | "
              f"{max(result.amr().values()):.3f} |", flush=True)


if __name__ == "__main__":
    main()

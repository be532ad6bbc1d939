"""Serving every task from one base: task-switch latency and memory per resident task.

    python scripts/bench_switch.py                 # 8 tasks, CLIP ViT-B/32 vision-tower shapes
    python scripts/bench_switch.py --tasks 2 --density 0.1

Synthesizes task models with the shapes of CLIP ViT-B/32's vision tower (as
``bench_methods.py``), merges them with DTS-D, loads the base into a ``CLIPVisionModel`` and
compares three ways to serve a task: materializing its full state dict and loading it
(``weights_for`` + ``load_state_dict``), switching the loaded model in place
(``result.apply``, undone exactly), and the low-rank forward path (``result.attach_low_rank``).
Prints latencies, forward times and the bytes each resident task costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_methods import synthesize  # noqa: E402

from harness import LazyStateDict, get_method  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass")
    args = parser.parse_args()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as folder:
        synthesize(folder, args.tasks)
        pretrained = LazyStateDict(os.path.join(folder, "pretrained.safetensors"))
        finetuned = {f"task{t}": LazyStateDict(os.path.join(folder, f"task{t}.safetensors"))
                     for t in range(args.tasks)}
        start = time.perf_counter()
        result = get_method("dts-d", density=args.density).merge(pretrained, finetuned)
        merge_s = time.perf_counter() - start
        config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=32)
        model = CLIPVisionModel(config).eval()
        tower = getattr(model, "vision_model", model)
        prefix = "vision_model." if tower is not model else ""
        base = {k: v.clone() for k, v in result.base.items()}
        model.load_state_dict(base, strict=False)
        x = torch.randn(args.batch, 3, 224, 224)
        tasks = result.tasks

        def materialize(task):
            model.load_state_dict(result.weights_for(task), strict=False)

        with torch.no_grad():
            forward_s = timed(lambda: model(pixel_values=x))
            materialize_s = statistics.median(timed(lambda t=t: materialize(t), 1)
                                              for t in tasks)
            model.load_state_dict(base, strict=False)
            switch_in, switch_out = [], []
            for task in tasks:
                start = time.perf_counter()
                handle = result.apply(model, task, prefix=prefix)
                switch_in.append(time.perf_counter() - start)
                start = time.perf_counter()
                handle.undo()
                switch_out.append(time.perf_counter() - start)
            attach, lowrank_forward = [], []
            for task in tasks:
                start = time.perf_counter()
                handle = result.attach_low_rank(model, task, prefix=prefix)
                attach.append(time.perf_counter() - start)
                lowrank_forward.append(timed(lambda: model(pixel_values=x), 1))
                handle.undo()
            before = rss_gib()
            resident = [result.weights_for(t) for t in tasks]
            materialized_gib = (rss_gib() - before) / len(tasks)
            del resident
        params = sum(v.numel() for v in result.base.values() if v.is_floating_point())
        stored = statistics.mean(result.stored_bytes(t) for t in tasks)
        print(f"# CLIP ViT-B/32 vision tower, {params:,} parameters, {len(tasks)} tasks, "
              f"DTS-D density {args.density}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        print(f"merge: {merge_s:.1f} s")
        print("| way to serve a task | switch s | back s | forward s (batch "
              f"{args.batch}) | bytes per resident task |")
        print("|---|---:|---:|---:|---:|")
        print(f"| materialize (weights_for + load_state_dict) | {materialize_s:.3f} | – | "
              f"{forward_s:.3f} | {params * 4:,} (measured RSS +{materialized_gib:.2f} GiB) |")
        print(f"| in place (result.apply / undo) | {statistics.median(switch_in):.3f} | "
              f"{statistics.median(switch_out):.3f} | {forward_s:.3f} | {stored:,.0f} |")
        print(f"| low-rank path (result.attach_low_rank) | {statistics.median(attach):.3f} | "
              f"– | {statistics.median(lowrank_forward):.3f} | {stored:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

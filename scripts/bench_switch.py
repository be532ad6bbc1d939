"""Serving every task from one base: task-switch latency and memory per resident task.

    python scripts/bench_switch.py                 # 8 tasks, CLIP ViT-B/32 vision-tower shapes
    python scripts/bench_switch.py --tasks 2 --density 0.1
    python scripts/bench_switch.py --device cuda   # merge, model and forward on a GPU

Synthesizes task models with the shapes of CLIP ViT-B/32's vision tower (as
``bench_methods.py``), merges them with DTS-D, loads the base into a ``CLIPVisionModel`` and
compares three ways to serve a task: materializing its full state dict and loading it
(``weights_for`` + ``load_state_dict``), switching the loaded model in place
(``result.apply``, undone exactly), and the low-rank forward path (``result.attach_low_rank``),
keeping decoded factors or only the codes. Prints latencies, forward times, the bytes each
resident task costs (for the low-rank paths the bytes the handle holds, and on a GPU the device
memory it adds) and how far the low-rank paths' outputs are from the in-place switch's.
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

from harness import LazyStateDict, get_method, merge_device  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def synchronize() -> None:
    """Wait for queued GPU work (if CUDA is in use), so a timing includes it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def low_rank_way(result, model, x, tasks, expected_outputs, prefix, keep) -> dict:
    """Attach each task's low-rank path keeping ``keep``: median attach and forward seconds,
    bytes the handle holds, GPU memory it adds (on a GPU), largest relative output error."""
    attach, forward, held, gpu, error = [], [], [], [], 0.0
    for task, expected in zip(tasks, expected_outputs):
        allocated = torch.cuda.memory_allocated() if torch.cuda.is_initialized() else 0
        synchronize()
        start = time.perf_counter()
        handle = result.attach_low_rank(model, task, prefix=prefix, keep=keep)
        synchronize()
        attach.append(time.perf_counter() - start)
        held.append(handle.held_bytes)
        if torch.cuda.is_initialized():
            gpu.append(torch.cuda.memory_allocated() - allocated)
        forward.append(timed(lambda: model(pixel_values=x), 1))
        got = model(pixel_values=x).last_hidden_state
        error = max(error, float((got - expected).norm() / expected.norm()))
        handle.undo()
    return {"attach_s": statistics.median(attach), "forward_s": statistics.median(forward),
            "held_bytes": statistics.median(held),
            "gpu_bytes": statistics.median(gpu) if gpu else None, "error": error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="cpu",
                        help="where the merge and the served model run")
    args = parser.parse_args()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as folder:
        synthesize(folder, args.tasks)
        pretrained = LazyStateDict(os.path.join(folder, "pretrained.safetensors"))
        finetuned = {f"task{t}": LazyStateDict(os.path.join(folder, f"task{t}.safetensors"))
                     for t in range(args.tasks)}
        start = time.perf_counter()
        with merge_device(args.device):
            result = get_method("dts-d", density=args.density).merge(pretrained, finetuned)
        synchronize()
        merge_s = time.perf_counter() - start
        config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=32)
        model = CLIPVisionModel(config).eval().to(args.device)
        tower = getattr(model, "vision_model", model)
        prefix = "vision_model." if tower is not model else ""
        base = {k: v.clone() for k, v in result.base.items()}
        model.load_state_dict(base, strict=False)
        x = torch.randn(args.batch, 3, 224, 224, device=args.device)
        tasks = result.tasks

        def materialize(task):
            model.load_state_dict(result.weights_for(task), strict=False)

        with torch.no_grad():
            forward_s = timed(lambda: model(pixel_values=x))
            materialize_s = statistics.median(timed(lambda t=t: materialize(t), 1)
                                              for t in tasks)
            model.load_state_dict(base, strict=False)
            switch_in, switch_out, switched = [], [], []
            for task in tasks:
                start = time.perf_counter()
                handle = result.apply(model, task, prefix=prefix)
                synchronize()
                switch_in.append(time.perf_counter() - start)
                switched.append(model(pixel_values=x).last_hidden_state)
                start = time.perf_counter()
                handle.undo()
                synchronize()
                switch_out.append(time.perf_counter() - start)
            low_rank = {keep: low_rank_way(result, model, x, tasks, switched, prefix, keep)
                        for keep in ("factors", "codes")}
            before = rss_gib()
            resident = [result.weights_for(t) for t in tasks]
            materialized_gib = (rss_gib() - before) / len(tasks)
            del resident
        params = sum(v.numel() for v in result.base.values() if v.is_floating_point())
        stored = statistics.mean(result.stored_bytes(t) for t in tasks)
        print(f"# CLIP ViT-B/32 vision tower, {params:,} parameters, {len(tasks)} tasks, "
              f"DTS-D density {args.density}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"served on {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_initialized() else ""))
        print(f"merge: {merge_s:.1f} s")
        print("| way to serve a task | switch s | back s | forward s (batch "
              f"{args.batch}) | bytes per resident task |")
        print("|---|---:|---:|---:|---:|")
        print(f"| materialize (weights_for + load_state_dict) | {materialize_s:.3f} | – | "
              f"{forward_s:.3f} | {params * 4:,} (measured RSS +{materialized_gib:.2f} GiB) |")
        print(f"| in place (result.apply / undo) | {statistics.median(switch_in):.3f} | "
              f"{statistics.median(switch_out):.3f} | {forward_s:.3f} | {stored:,.0f} |")
        for keep, way in low_rank.items():
            gpu = (f"; GPU +{way['gpu_bytes']:,.0f}" if way["gpu_bytes"] is not None else "")
            print(f"| low-rank path (result.attach_low_rank, keep=\"{keep}\") | "
                  f"{way['attach_s']:.3f} | – | {way['forward_s']:.3f} | "
                  f"{way['held_bytes']:,.0f} held{gpu} |")
        print("low-rank paths against the in-place switch: relative output difference "
              + ", ".join(f"{keep} {way['error']:.1e}" for keep, way in low_rank.items())
              + " (largest over tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

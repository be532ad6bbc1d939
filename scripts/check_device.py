"""Every method merged on the CPU and on a GPU: time of each, stored bytes, served-weight error.

    python scripts/check_device.py --device cuda              # a GPU machine
    python scripts/check_device.py --device cuda --methods ties dts-d --tasks 8

Synthesizes CLIP ViT-B/32-shaped models (as ``bench_methods.py`` does), merges them with each
method on the CPU and inside ``merge_device(DEVICE)`` in one process, and prints per method: the
CPU and device merge seconds (after one warm-up SVD on the device), whether every task stores the
same number of bytes, and the largest relative error of any served tensor,
``|gpu - cpu| / |cpu - pretrained|`` (Frobenius, over keys and tasks): the device's floating-point
rounding measured against the task's own change, which is what a merge adds. The emulated-device
tests check that methods keep every tensor on the device; this checks a real one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_methods import synthesize  # noqa: E402

# the SVD baseline's default budget (DTS-T's AMR) leaves ViT-B/32 rank 0: give it ranks to check
HYPERPARAMETERS = {"svd": {"density": 0.1}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_merge(name: str, pretrained, finetuned, device: torch.device):
    from harness import get_method, merge_device

    method = get_method(name, **HYPERPARAMETERS.get(name, {}))
    synchronize(device)
    start = time.perf_counter()
    with merge_device(device):
        result = method.merge(pretrained, finetuned)
    synchronize(device)
    return result, time.perf_counter() - start


def served_error(on_cpu, on_device, pretrained) -> float:
    """Largest ``|device - cpu| / |cpu - pretrained|`` over served tensors and tasks."""
    worst = 0.0
    for task in on_cpu.tasks:
        a, b = on_cpu.weights_for(task), on_device.weights_for(task)
        if a.keys() != b.keys():
            raise AssertionError(f"{task}: the device result serves other keys")
        for key, value in a.items():
            if not value.is_floating_point():
                continue
            change = (value.float() - pretrained[key].float()).norm()
            diff = (b[key].float() - value.float()).norm()
            if diff > 0:
                worst = max(worst, float(diff / change) if change > 0 else float("inf"))
    return worst


def main() -> int:
    from harness import LazyStateDict, list_methods

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--tasks", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.linalg.svd(torch.randn(256, 256, device=device))   # load cuSOLVER before timing
        name = torch.cuda.get_device_name(device)
    else:
        name = str(device)
    print(f"# {name} against {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; CLIP ViT-B/32 vision tower x {args.tasks} tasks")
    print("| method | CPU s | device s | same stored bytes | max served error |")
    print("|---|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory(prefix="check-device-") as folder:
        synthesize(folder, args.tasks)
        pretrained = LazyStateDict(os.path.join(folder, "pretrained.safetensors"))
        finetuned = {f"task{t}": LazyStateDict(os.path.join(folder, f"task{t}.safetensors"))
                     for t in range(args.tasks)}
        failed = False
        for method in args.methods or list_methods():
            try:
                on_cpu, cpu_s = timed_merge(method, pretrained, finetuned, torch.device("cpu"))
                on_device, device_s = timed_merge(method, pretrained, finetuned, device)
                same = all(on_cpu.stored_bytes(t) == on_device.stored_bytes(t)
                           for t in on_cpu.tasks)
                error = served_error(on_cpu, on_device, pretrained)
            except Exception as exc:        # report and go on: one method must not hide others
                failed = True
                print(f"| {method} | failed: {type(exc).__name__}: {exc} | | | |", flush=True)
                continue
            print(f"| {method} | {cpu_s:.2f} | {device_s:.2f} | {'yes' if same else 'NO'} | "
                  f"{error:.1e} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

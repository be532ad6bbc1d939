"""Every method merged on the CPU and on a GPU: time of each, stored bytes, served-weight error.

    python scripts/check_device.py --device cuda              # a GPU machine
    python scripts/check_device.py --device cuda --methods ties dts-d --tasks 8

Synthesizes CLIP ViT-B/32-shaped models (as ``bench_methods.py`` does), merges them with each
method on the CPU and inside ``merge_device(DEVICE)`` in one process, and prints per method: the
CPU and device merge seconds (after one warm-up SVD on the device), whether every task stores the
same number of bytes, and the largest relative errors of any served tensor (Frobenius, over keys
and tasks, each divided by the task's own change ``|task - pretrained|``): the device's result
against the CPU's, and each against the task model (how well each serves the task; a low-rank
method's factors can differ between LAPACK and cuSOLVER where singular values nearly tie, so the
last two columns say whether the device serves tasks as well). Records whose stored bytes
differ are listed. The emulated-device tests check that methods keep every tensor on the
device; this checks a real one.
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
from bench_switch import synchronize  # noqa: E402

# the SVD baseline's default budget (DTS-T's AMR) leaves ViT-B/32 rank 0: give it ranks to check
HYPERPARAMETERS = {"svd": {"density": 0.1}}


def timed_merge(name: str, pretrained, finetuned, device: torch.device):
    from harness import get_method, merge_device

    method = get_method(name, **HYPERPARAMETERS.get(name, {}))
    synchronize()
    start = time.perf_counter()
    with merge_device(device):
        result = method.merge(pretrained, finetuned)
    synchronize()
    return result, time.perf_counter() - start


def served_errors(on_cpu, on_device, pretrained, finetuned) -> tuple[float, float, float]:
    """Largest relative errors over served tensors and tasks, each over ``|task - pretrained|``
    (Frobenius): device against CPU, then CPU and device each against the task model."""
    worst = [0.0, 0.0, 0.0]
    for task in on_cpu.tasks:
        a, b = on_cpu.weights_for(task), on_device.weights_for(task)
        if a.keys() != b.keys():
            raise AssertionError(f"{task}: the device result serves other keys")
        for key, value in a.items():
            if not value.is_floating_point():
                continue
            target = finetuned[task][key].float()
            change = (target - pretrained[key].float()).norm()
            diffs = [(b[key].float() - value.float()).norm(), (value.float() - target).norm(),
                     (b[key].float() - target).norm()]
            for i, diff in enumerate(diffs):
                if diff > 0:
                    worst[i] = max(worst[i], float(diff / change) if change > 0 else float("inf"))
    return tuple(worst)


def codec_summary(codec) -> str:
    """What one stored record holds: its kind, bytes, and for factors their exact zeros and NaNs."""
    from harness.engine.codecs import LowRank

    text = f"{type(codec).__name__} {codec.nbytes:,} B"
    if isinstance(codec, LowRank):
        u, v = codec.u.decode(), codec.v.decode()
        text += (f", U zeros {int((u == 0).sum())} NaN {int(u.isnan().sum())}, "
                 f"V zeros {int((v == 0).sum())} NaN {int(v.isnan().sum())}")
    return text


def differing_records(on_cpu, on_device, limit: int = 3) -> list[str]:
    """The first records whose stored bytes differ between the two results."""
    out = []
    for task in on_cpu.tasks:
        cpu, dev = on_cpu.payloads[task].records, on_device.payloads[task].records
        for key in sorted(cpu.keys() | dev.keys()):
            a, b = cpu.get(key), dev.get(key)
            if a is None or b is None or a.nbytes != b.nbytes:
                out.append(f"{task} {key}: CPU {a and codec_summary(a)}; "
                           f"device {b and codec_summary(b)}")
                if len(out) == limit:
                    return out
    return out


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
    print("| method | CPU s | device s | same stored bytes | device vs CPU | CPU vs task model "
          "| device vs task model |")
    print("|---|---:|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="check-device-") as folder:
        synthesize(folder, args.tasks)
        pretrained = LazyStateDict(os.path.join(folder, "pretrained.safetensors"))
        finetuned = {f"task{t}": LazyStateDict(os.path.join(folder, f"task{t}.safetensors"))
                     for t in range(args.tasks)}
        failed, differing = False, []
        for method in args.methods or list_methods():
            try:
                on_cpu, cpu_s = timed_merge(method, pretrained, finetuned, torch.device("cpu"))
                on_device, device_s = timed_merge(method, pretrained, finetuned, device)
                same = all(on_cpu.stored_bytes(t) == on_device.stored_bytes(t)
                           for t in on_cpu.tasks)
                errors = served_errors(on_cpu, on_device, pretrained, finetuned)
            except Exception as exc:        # report and go on: one method must not hide others
                failed = True
                print(f"| {method} | failed: {type(exc).__name__}: {exc} | | | | | |", flush=True)
                continue
            print(f"| {method} | {cpu_s:.2f} | {device_s:.2f} | {'yes' if same else 'NO'} | "
                  + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
            if not same:
                differing.extend(f"{method}: {line}"
                                 for line in differing_records(on_cpu, on_device))
    if differing:
        print("records whose stored bytes differ:\n" + "\n".join(differing))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

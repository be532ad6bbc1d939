"""Merge time, peak memory and stored bytes of every method on CLIP ViT-B/32-shaped models.

Synthesizes a pretrained model and N task models with the exact tensor names and shapes of
transformers' ``CLIPVisionModel`` (patch 32; no weights are downloaded: the config is built in
code), saves them as safetensors, then merges them with each method in a fresh process reading
the inputs memory-mapped. Task vectors are rank-4 products plus 10% dense noise at 1e-3 of each
tensor's RMS, the recipe of the peer measurements in ``docs/performance.md``.

    python scripts/bench_methods.py                 # all methods, 8 tasks
    python scripts/bench_methods.py --methods ties dts-d --tasks 4
    python scripts/bench_methods.py --dir /tmp/vit-b32   # keep the models for the next run
    python scripts/bench_methods.py --methods ties task-arithmetic --repeat 3   # medians
    python scripts/bench_methods.py --inputs memory --methods task-arithmetic plain-task-arithmetic
    python scripts/bench_methods.py --load 2 --methods task-arithmetic plain-task-arithmetic

Prints one row per method: merge seconds, peak resident memory (GiB), peak above the memory of
just reading every input once, bytes stored per task, and AMR (stored bytes; the paper's count
for DTS). ``--repeat N`` runs the read floor and every method N times in rounds (the machine's
drift falls on each alike) and prints median seconds with their range and the largest peaks.

``--inputs memory`` loads every model into memory first (what a user passes from
``model.state_dict()``; the load is not timed) instead of memory-mapping it. The rows
``plain-task-arithmetic``, ``plain-weight-averaging`` and ``plain-ties`` are the same merges in
a few lines of key-by-key torch (no checks), the reference the engine's overhead is measured
against.
``--load N`` runs a job of N busy torch threads beside every measured run (a shared node).
A method may carry hyperparameters, ``NAME:KEY=VALUE,...`` (``dts-d:svd_solver=gram``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))      # bench_scale's SVD floor, also in tests


def vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """Float tensor shapes of ``CLIPVisionModel`` with the ViT-B/32 config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32,
                              projection_dim=512)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}


def synthesize(folder: str, n_tasks: int, seed: int = 0) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = vit_b32_shapes()
    pretrained = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(pretrained, os.path.join(folder, "pretrained.safetensors"))
    for t in range(n_tasks):
        model = {}
        for key, base in pretrained.items():
            rms = float(base.pow(2).mean().sqrt())
            matrix = base.reshape(base.shape[0], -1) if base.dim() > 1 else base.reshape(1, -1)
            m, n = matrix.shape
            low = (torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)) * (0.01 * rms)
            noise = torch.randn(m, n, generator=g) * (1e-3 * rms)
            noise *= torch.rand(m, n, generator=g) < 0.1
            model[key] = base + (low + noise).reshape(base.shape)
        save_file(model, os.path.join(folder, f"task{t}.safetensors"))
        del model


def peak_rss_gib() -> float:
    from harness.bench.provenance import peak_rss_bytes

    return peak_rss_bytes() / 2**30


def plain_task_arithmetic(pretrained, finetuned, lam: float = 0.3) -> dict:
    """Task Arithmetic as a user writes it in torch: key by key, float32, no checks."""
    merged = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            merged[key] = base
            continue
        theta0 = base.float()
        total = sum(sd[key].float() - theta0 for sd in finetuned.values())
        merged[key] = (theta0 + lam * total).to(base.dtype)
    return merged


def plain_weight_averaging(pretrained, finetuned) -> dict:
    merged = {}
    for key, base in pretrained.items():
        merged[key] = base if not base.is_floating_point() else (
            sum(sd[key].float() for sd in finetuned.values()) / len(finetuned)).to(base.dtype)
    return merged


def plain_ties(pretrained, finetuned, k: float = 20.0, lam: float = 0.3) -> dict:
    """TIES as a user writes it in torch from the paper (the authors' recipe, no checks): each
    task vector flattened whole to find its top-k% magnitude threshold (``kthvalue``), then key
    by key: trim, elect the sign of the summed trimmed entries, sum those agreeing."""
    keys = [key for key, base in pretrained.items() if base.is_floating_point()]
    thresholds = {}
    for task, sd in finetuned.items():
        flat = torch.cat([(sd[key].float() - pretrained[key].float()).reshape(-1) for key in keys])
        rank = flat.numel() - int(flat.numel() * k / 100)
        thresholds[task] = float(flat.abs().kthvalue(rank).values)
        del flat
    merged = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            merged[key] = base
            continue
        theta0 = base.float()
        taus = torch.stack([sd[key].float() - theta0 for sd in finetuned.values()])
        cuts = torch.tensor([thresholds[t] for t in finetuned]).reshape(-1, *[1] * theta0.dim())
        trimmed = torch.where(taus.abs() >= cuts, taus, torch.zeros_like(taus))
        sign = torch.sign(trimmed.sum(dim=0))
        agree = torch.where(torch.sign(trimmed) == sign, trimmed, torch.zeros_like(trimmed))
        merged[key] = (theta0 + lam * agree.sum(dim=0)).to(base.dtype)
    return merged


def plain_weight_averaging_float64(pretrained, finetuned) -> dict:
    """Weight averaging accumulated in float64, weight-averaging's arithmetic (its [decision]:
    N copies of one model average to that model), key by key."""
    merged = {}
    for key, base in pretrained.items():
        merged[key] = base if not base.is_floating_point() else (
            sum(sd[key].double() for sd in finetuned.values()) / len(finetuned)
        ).to(base.dtype)
    return merged


def plain_dare(pretrained, finetuned, p: float = 0.5, lam: float = 0.3, seed: int = 0) -> dict:
    """DARE then Task Arithmetic as a user writes it in torch, key by key, drawing from the
    same per-(seed, task, key) generators as dare (so it merges the same model)."""
    from methods.dare import key_generator

    merged = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            merged[key] = base
            continue
        theta0 = base.float()
        total = 0
        for task, sd in finetuned.items():
            tau = sd[key].float() - theta0
            keep = torch.rand(tau.shape, generator=key_generator(seed, task, key)) >= p
            total = total + tau * keep / (1 - p)
        merged[key] = (theta0 + lam * total).to(base.dtype)
    return merged


def plain_emr(pretrained, finetuned) -> tuple[dict, dict, dict]:
    """EMR-Merging as its authors' code runs it, key by key: ``(tau_uni, each task's bool
    masks, each task's lambda)`` (masks at a byte per entry)."""
    tau_uni, masks = {}, {task: {} for task in finetuned}
    numerator, denominator = dict.fromkeys(finetuned, 0.0), dict.fromkeys(finetuned, 0.0)
    for key, base in pretrained.items():
        if not base.is_floating_point():
            continue
        theta0 = base.float()
        stacked = torch.stack([sd[key].float() - theta0 for sd in finetuned.values()])
        if not stacked.any():
            continue
        flag = torch.where(stacked.mean(dim=0) > 0, 1.0, -1.0)
        kept = stacked * flag > 0
        tau_uni[key] = flag * (stacked * kept).abs().amax(dim=0)
        for row, task in enumerate(finetuned):
            masks[task][key] = kept[row]
            numerator[task] += float(stacked[row].abs().mean())
            denominator[task] += float((tau_uni[key] * kept[row]).abs().mean())
    return tau_uni, masks, {t: numerator[t] / denominator[t] for t in finetuned}


def plain_tall_mask(pretrained, finetuned, lam: float = 0.4) -> tuple[dict, dict]:
    """TALL-Mask as a user writes it in torch, key by key: ``(tau_MTL, each task's bool
    masks |tau_t| > lam * |tau_MTL - tau_t|)``."""
    mtl, masks = {}, {task: {} for task in finetuned}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            continue
        theta0 = base.float()
        taus = [sd[key].float() - theta0 for sd in finetuned.values()]
        if not any(tau.any() for tau in taus):
            continue
        mtl[key] = sum(taus)
        for task, tau in zip(finetuned, taus):
            masks[task][key] = tau.abs() > lam * (mtl[key] - tau).abs()
    return mtl, masks


PLAIN = {"plain-task-arithmetic": plain_task_arithmetic,
         "plain-weight-averaging": plain_weight_averaging,
         "plain-weight-averaging-float64": plain_weight_averaging_float64,
         "plain-dare": plain_dare,
         "plain-ties": plain_ties,
         "plain-emr": plain_emr,
         "plain-tall-mask": plain_tall_mask}


def worker(method_name: str, folder: str, n_tasks: int, inputs: str = "mmap") -> dict:
    from harness import LazyStateDict, get_method

    if inputs == "memory":
        from safetensors.torch import load_file

        def load(path):
            return load_file(path)
    else:
        load = LazyStateDict
    pretrained = load(os.path.join(folder, "pretrained.safetensors"))
    finetuned = {f"task{t}": load(os.path.join(folder, f"task{t}.safetensors"))
                 for t in range(n_tasks)}
    if method_name in PLAIN:
        start = time.perf_counter()
        PLAIN[method_name](pretrained, finetuned)
        return {"seconds": time.perf_counter() - start, "peak_gib": peak_rss_gib(),
                "bytes_per_task": 0, "amr": 0.0}
    if method_name == "read-inputs":
        start = time.perf_counter()
        for sd in [pretrained, *finetuned.values()]:
            for key in sd:
                sd[key].sum()
        return {"seconds": time.perf_counter() - start, "peak_gib": peak_rss_gib()}
    if method_name == "svd-floor":       # the exact SVDs alone, as DTS calls them
        from bench_scale import svd_floor

        start = time.perf_counter()
        svd_floor(pretrained, finetuned, "cpu")
        return {"seconds": time.perf_counter() - start, "peak_gib": peak_rss_gib()}
    name, _, settings = method_name.partition(":")     # e.g. dts-d:svd_solver=gram
    method = get_method(name, **dict(item.split("=", 1) for item in settings.split(",") if item))
    start = time.perf_counter()
    result = method.merge(pretrained, finetuned)
    seconds = time.perf_counter() - start
    tasks = result.tasks
    out = {"seconds": seconds, "peak_gib": peak_rss_gib(),
           "bytes_per_task": max(result.stored_bytes(t) for t in tasks),
           "amr": max(result.amr().values()), "info": result.info}
    if result.paper_bits is not None:
        out["amr_paper"] = max(result.amr("paper").values())
    return out


OPTIONS = {"inputs": "mmap", "load": 0}       # set by main, read by every run


def busy(threads: int) -> subprocess.Popen:
    """A job of ``threads`` busy torch threads (matrix products), until killed."""
    code = ("import torch; torch.set_num_threads(%d); a = torch.randn(512, 512)\n"
            "while True: a = torch.tanh(a @ a)" % threads)
    return subprocess.Popen([sys.executable, "-c", code])


def run_worker(method_name: str, folder: str, n_tasks: int) -> dict:
    # the project after any PYTHONPATH already set (an export of older code, to compare with)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), ROOT) if p))
    load = busy(OPTIONS["load"]) if OPTIONS["load"] else None
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", method_name, "--dir",
                               folder, "--tasks", str(n_tasks), "--inputs", OPTIONS["inputs"]],
                              capture_output=True, text=True, env=env)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--dir", default=None,
                        help="synthesize the models here and keep them for reuse (default: a "
                             "temporary folder, removed at the end)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run the floor and every method N times, in rounds: medians")
    parser.add_argument("--inputs", choices=["mmap", "memory"], default="mmap",
                        help="memory-mapped safetensors, or state dicts loaded into memory")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="run N busy torch threads beside every measured run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(worker(args.worker, args.dir, args.tasks, args.inputs)))
        return
    OPTIONS.update(inputs=args.inputs, load=args.load)

    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        compare(args.dir, args.tasks, args.methods, args.repeat)
    else:       # 3 GB of synthesized models for 8 tasks: removed at the end, even on an error
        with tempfile.TemporaryDirectory(prefix="bench-methods-") as folder:
            compare(folder, args.tasks, args.methods, args.repeat)


def method_row(name: str, runs: list[dict], floor_gib: float) -> str:
    """One table row from a method's runs: median seconds (with their range over several
    runs), the largest peak, and what it stores (the same in every run)."""
    from bench_scale import seconds_text, summarize

    failed = [run["error"] for run in runs if "error" in run]
    if failed:
        return f"| {name} | failed: {failed[0]} | | | | | |"
    row, last = summarize(runs), runs[-1]
    paper = f"{last['amr_paper']:.2f}" if "amr_paper" in last else ""
    return (f"| {name} | {seconds_text(row, 2)} | {row['peak_gib']:.2f} | {row['peak_gib'] - floor_gib:+.2f} | "
            f"{last['bytes_per_task']:,} | {last['amr']:.3f} | {paper} |")


def compare(folder: str, n_tasks: int, method_names: list[str] | None, repeat: int = 1) -> None:
    """Synthesize the models in ``folder`` unless they are there, then print the table."""
    from bench_scale import seconds_text, summarize

    from harness import list_methods

    if not os.path.exists(os.path.join(folder, f"task{n_tasks - 1}.safetensors")):
        start = time.perf_counter()
        synthesize(folder, n_tasks)
        print(f"synthesized {n_tasks} task models in {folder} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    methods = method_names or list_methods()
    print(f"# {platform.node()}: {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; CLIP ViT-B/32 vision tower x {n_tasks} tasks; inputs "
          f"{OPTIONS['inputs']}" + (f"; {OPTIONS['load']} busy threads beside"
                                    if OPTIONS["load"] else ""))
    runs: dict[str, list[dict]] = {name: [] for name in ["read-inputs", *methods]}
    if repeat > 1:      # every run first, in rounds; a single run prints each row as it goes
        for round_ in range(repeat):
            for name in runs:
                runs[name].append(run_worker(name, folder, n_tasks))
                print(f"# round {round_ + 1}/{repeat}: {name} "
                      f"{runs[name][-1].get('seconds', float('nan')):.2f} s", flush=True)
    else:
        runs["read-inputs"].append(run_worker("read-inputs", folder, n_tasks))
    floor = summarize(runs["read-inputs"])
    print(f"reading all inputs once: {seconds_text(floor, 2)} s, "
          f"peak RSS {floor['peak_gib']:.2f} GiB")
    if any(name.split(":")[0] == "svd" or name.startswith("dts") for name in methods):
        svd_floor = run_worker("svd-floor", folder, n_tasks)
        print(f"exact SVDs of every 2-D task vector: {svd_floor['seconds']:.1f} s")
    header = ("| method | merge s | peak RSS GiB | above read-once GiB | bytes stored/task "
              "| AMR % (stored) | AMR % (paper count) |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in methods:
        if not runs[name]:
            runs[name].append(run_worker(name, folder, n_tasks))
        print(method_row(name, runs[name], floor["peak_gib"]), flush=True)


if __name__ == "__main__":
    main()

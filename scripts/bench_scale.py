"""Out-of-core merging at LLM scale: sharded checkpoints with Qwen2.5 tensor shapes.

    python scripts/bench_scale.py --size 0.5b --layers 4 --tasks 3
    python scripts/bench_scale.py --size 14b --layers 1 --tasks 3 --no-embeddings --methods ties
    python scripts/bench_scale.py --size 7b --only-embeddings --tasks 1 --methods dts-d
    python scripts/bench_scale.py --size 0.5b --methods ties --mergekit /path/to/mergekit-venv
    python scripts/bench_scale.py --size 14b --tasks 3 --device cuda     # a GPU machine
    python scripts/bench_scale.py --size 0.5b --methods ties --ties-held-mib 0
    python scripts/bench_scale.py --size 14b --layers 1 --methods ties --cold   # from the disk
    python scripts/bench_scale.py --size 0.5b --methods ties --memory-limit 2   # inputs > memory
    python scripts/bench_scale.py --size 14b --layers 1 --methods ties --repeat 3  # median of 3
    python scripts/bench_scale.py --size 14b --layers 1 --tasks 1 --no-embeddings \
        --methods svd-floor dts-d       # DTS-D against the exact SVDs it needs

``--mergekit VENV`` also merges the same inputs with mergekit's TIES (``mergekit-yaml`` from a
separate environment used only here, e.g. ``python3 -m venv VENV && VENV/bin/pip install -c
constraints.txt mergekit==0.1.5``) and prints its time and peak memory in the same table.
mergekit needs whole architectures: keep the embeddings. Its TIES trims per tensor (density 0.2,
weight 0.3 per task), not over the whole model as the official TIES does.

Synthesizes a pretrained model and task models with the tensor shapes of a Qwen2.5 architecture
(optionally only the first N decoder layers, with or without the 150k-token embedding), saved as
Hugging Face sharded safetensors (an index plus shards), written tensor by tensor. Then, each in
a fresh process: reading every input once in its stored dtype (the read floor: a sum over each
memory-mapped tensor, no copy), reading it into float32 row blocks (what any float32 arithmetic
on these inputs pays at least: the cast, in reused scratch), writing one model's worth of shards
(the pretrained model's tensors streamed to a copy: what writing a merged model costs at least),
and each method merging the memory-mapped inputs with its outputs streamed to shards
(``harness.stream_outputs``). ``--cold`` drops the inputs from the page cache before every run,
so each reads them from the disk, as merges of models larger than memory do (a two-pass
method's second pass still finds them cached when they fit in memory); ``--memory-limit GIB``
runs every worker in a memory cgroup of that size, page cache included, so inputs larger than
it are read from the disk in every pass, as on a machine with that much memory (it implies
``--cold``: cached pages stay charged to the cgroup that read them first). Prints wall time,
the CPU time the run used (user and system, over all its threads; the system part is the
kernel's work charged to the process, page faults and reading and writing files included, while
I/O completion and write-back in the kernel's own threads are not: a merge whose CPU time over
the core count exceeds its read floor is bound by the CPU, not the disk), read throughput, the
time over the read floor and over the read and write floors together, and peak resident memory
next to the largest tensor (``VmHWM``, and sampled every 10 ms, its anonymous and file-backed
parts: mapped input pages are file-backed, and the kernel can drop them), and the input bytes
the merge asked the kernel to read ahead (none when the inputs are cached, but for outputs read
back, such as DTS's streamed TIES base, written past the page cache; a merge from the disk that
hints nothing has lost its read-ahead); with ``--device cuda`` the methods compute on the GPU
(``harness.merge_device``) and the peak GPU memory is printed too. ``--repeat N`` runs the
whole list N times in rounds (so the machine's drift falls on every run alike) and prints each
run's median wall time with its range, the median CPU time, ratios of medians, and the largest
peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "7b": (3584, 18944, 28, 28, 4, 152064, False),
    "14b": (5120, 13824, 48, 40, 8, 152064, False),
}


def model_config(size: str, layers: int | None):
    from transformers import Qwen2Config

    hidden, inter, depth, heads, kv, vocab, tied = SIZES[size]
    return Qwen2Config(hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=min(layers or depth, depth), num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
                       architectures=["Qwen2ForCausalLM"])


def shapes(size: str, layers: int | None, embeddings: str) -> dict[str, tuple[int, ...]]:
    """Float tensor shapes of ``Qwen2ForCausalLM`` for the size (built on the meta device);
    ``embeddings``: "with", "without", or "only" (the 150k-token embedding and output head)."""
    from transformers import Qwen2ForCausalLM

    config = model_config(size, layers)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    out = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    if embeddings != "with":
        only = embeddings == "only"
        out = {k: s for k, s in out.items()
               if ("embed_tokens" in k or "lm_head" in k) == only}
    return out


def write_sharded(folder: str, tensors, shard_bytes: int) -> int:
    """Write (key, tensor) pairs as HF shards plus index, one shard in memory at a time."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    weight_map, pending, size, total, n = {}, {}, 0, 0, 0

    def flush():
        nonlocal pending, size, n
        if pending:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(pending, os.path.join(folder, name))
            weight_map.update({k: name for k in pending})
            pending, size = {}, 0

    for key, tensor in tensors:
        pending[key] = tensor
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def synthesize(root: str, shape_of: dict, tasks: int, dtype: torch.dtype, shard_bytes: int):
    def base_tensors():
        for i, (key, shape) in enumerate(shape_of.items()):
            g = torch.Generator().manual_seed(i)
            yield key, (torch.randn(shape, generator=g) * 0.02).to(dtype)

    write_sharded(os.path.join(root, "pretrained"), base_tensors(), shard_bytes)
    for t in range(tasks):
        def task_tensors(t=t):
            for i, (key, base) in enumerate(base_tensors()):
                g = torch.Generator().manual_seed(10_000 * (t + 1) + i)
                m, n = base.shape[0], base[0].numel() if base.dim() > 1 else 1
                low = (torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)) * 2e-4
                yield key, (base.float() + low.reshape(base.shape)).to(dtype)
        write_sharded(os.path.join(root, f"task{t}"), task_tensors(), shard_bytes)


def peak_gib() -> float:
    from harness.bench.provenance import peak_rss_bytes

    return peak_rss_bytes() / 2**30


class ResidentSampler:
    """Peak anonymous and peak file-backed resident memory, read from ``/proc/self/status``
    every 10 ms in a thread: ``VmHWM`` counts both, and file-backed pages are mapped inputs the
    kernel can drop at will, while anonymous ones are what the merge itself holds."""

    def __init__(self) -> None:
        import threading

        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssFile:")):
                    kib = int(line.split()[1]) * 1024
                    if line.startswith("RssAnon:"):
                        self.anon = max(self.anon, kib)
                    else:
                        self.file = max(self.file, kib)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def mergekit_worker(venv: str, root: str, tasks: int) -> dict:
    """mergekit's TIES on the same inputs; peak memory is that of its process."""
    config = os.path.join(root, "mergekit.yml")
    with open(config, "w") as f:
        f.write(f"merge_method: ties\nbase_model: {os.path.join(root, 'pretrained')}\n"
                "parameters: {normalize: false}\ndtype: bfloat16\nmodels:\n" +
                "".join(f"  - model: {os.path.join(root, f'task{t}')}\n"
                        "    parameters: {density: 0.2, weight: 0.3}\n" for t in range(tasks)))
    start, cpu = time.perf_counter(), os.times()
    with tempfile.TemporaryDirectory(dir=root) as out:
        done = subprocess.run([os.path.join(venv, "bin", "python"), "-c", MERGEKIT_WITH_PEAK,
                               config, out, "--lazy-unpickle", "--no-copy-tokenizer"],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"mergekit-yaml failed: {done.stderr[-1500:]}")
    seconds, used = time.perf_counter() - start, os.times()
    peak_kb = int(done.stderr.rsplit("VmHWM:", 1)[1].split()[0])
    system = used.children_system - cpu.children_system
    return {"seconds": seconds, "peak_gib": peak_kb / 2**20, "system_s": system,
            "cpu_s": used.children_user - cpu.children_user + system}


# mergekit-yaml's entry point, printing its own peak resident memory (VmHWM) when it exits
MERGEKIT_WITH_PEAK = """
import atexit, sys
atexit.register(lambda: print(next(l for l in open("/proc/self/status")
                                   if l.startswith("VmHWM:")), file=sys.stderr))
sys.argv[0] = "mergekit-yaml"
from mergekit.scripts.run_yaml import main
sys.exit(main())
"""


def svd_floor(pretrained, finetuned, device: str) -> None:
    """The SVD of every 2-D task vector as DTS computes it, on ``device``, and nothing else:
    thin and whole (a wide matrix through its transpose) up to ``IN_MEMORY_SVD_BYTES`` in
    float32, larger ones block by block at DTS-D's default rank. DTS's floor."""
    from harness import get_method, merge_device
    from harness.engine.passes import BlockedDelta
    from harness.methods.dts import (IN_MEMORY_SVD_BYTES, blocked_truncated_svd, dts_rank,
                                     truncated_svd)

    density = get_method("dts-d").density
    with merge_device(device):
        for sd in finetuned.values():
            for key in sd:
                shape = tuple(sd[key].shape)
                if len(shape) != 2:
                    continue
                if 4 * shape[0] * shape[1] > IN_MEMORY_SVD_BYTES:
                    blocked_truncated_svd(BlockedDelta(pretrained[key], sd[key]),
                                          dts_rank(density, shape))
                else:
                    delta = (sd[key].to(device, torch.float32)
                             - pretrained[key].to(device, torch.float32))
                    truncated_svd(delta, min(shape))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()


def read_as_float32(pretrained, finetuned) -> None:
    """Every input once, copied (cast, unless it is float32) into reused float32 row-block
    scratch, as merges cast their inputs: the least any float32 arithmetic on bfloat16 inputs
    costs."""
    from harness.core.tensors import BlockBuffers
    from harness.io.pages import row_blocks

    buffers = BlockBuffers()
    for sd in (pretrained, *finetuned.values()):
        for key in sd:
            tensor = sd[key]
            for rows in row_blocks(tuple(tensor.shape), 1):
                block = tensor[rows]
                buffers.view("block", block).copy_(block)


def evict_inputs(root: str) -> None:
    """Drop the input files' pages from the page cache (``posix_fadvise(DONTNEED)``; they were
    synced when written), so the next run reads them from the disk, as a merge of models larger
    than memory does; the libraries a run loads stay cached. Exits if a page stays cached."""
    from harness.io.pages import page_cached

    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                size = os.fstat(descriptor).st_size
                if size > 2**20 and page_cached(descriptor, size // 2):
                    raise SystemExit(f"--cold: {path} stays in the page cache after "
                                     "POSIX_FADV_DONTNEED (a memory-backed file system?)")
            finally:
                os.close(descriptor)


class MemoryCgroup:
    """A memory cgroup under this process's own, limited to ``limit`` bytes (page cache
    included), for the workers to run in: inputs larger than the limit are read from the disk in
    every pass, as on a machine with that much memory, and a merge needing more is killed.
    Linux, as root or in a delegated cgroup; the v1 memory controller where mounted, else v2."""

    def __init__(self, limit: int, proc: str = "/proc/self/cgroup",
                 root: str = "/sys/fs/cgroup") -> None:
        from harness.io.pages import memory_cgroup_paths

        v1, v2 = memory_cgroup_paths(proc)
        name = f"bench-scale-{os.getpid()}"
        if v1 is not None:
            self.folder = os.path.join(root, "memory", v1, name)
            self.limit_file = "memory.limit_in_bytes"
        elif v2 is not None:
            self.folder = os.path.join(root, v2, name)
            self.limit_file = "memory.max"
        else:
            raise SystemExit(f"--memory-limit: no memory cgroup in {proc}")
        self.limit = limit

    def __enter__(self) -> MemoryCgroup:
        try:
            os.mkdir(self.folder)
            with open(os.path.join(self.folder, self.limit_file), "w", encoding="ascii") as f:
                f.write(str(self.limit))
        except OSError as error:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)
            raise SystemExit(f"--memory-limit needs a memory cgroup this process can create "
                             f"(Linux, as root or in a delegated cgroup): {error}") from None
        return self

    def join(self) -> None:
        """Move the calling process in (a ``preexec_fn``: the worker, before it starts)."""
        with open(os.path.join(self.folder, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write(str(os.getpid()))

    def __exit__(self, *exc) -> None:
        os.rmdir(self.folder)


def worker(method: str, root: str, tasks: int, device: str, ties_held_mib: int | None) -> dict:
    from harness import LazyStateDict, get_method, merge_device, stream_outputs
    from harness.engine.outputs import finish_output, new_output
    from harness.io.pages import READ_AHEAD

    if ties_held_mib is not None:
        import harness.engine.deferred

        harness.engine.deferred.HELD_BYTES = ties_held_mib * 2**20

    pretrained = LazyStateDict(os.path.join(root, "pretrained"))
    finetuned = {f"task{t}": LazyStateDict(os.path.join(root, f"task{t}")) for t in range(tasks)}
    start, cpu = time.perf_counter(), os.times()
    with ResidentSampler() as sampled:
        if method == "read":        # every byte once, in its stored dtype: no copy
            for sd in (pretrained, *finetuned.values()):
                for key in sd:
                    float(sd[key].sum())
        elif method == "read-float32":
            read_as_float32(pretrained, finetuned)
        elif method == "write":
            with tempfile.TemporaryDirectory(dir=root) as out, stream_outputs(out, 2**30):
                copy = new_output("pretrained-copy")
                for key in pretrained:
                    copy[key] = pretrained[key]
                finish_output(copy)
        elif method == "svd-floor":
            svd_floor(pretrained, finetuned, device)
        else:
            with (tempfile.TemporaryDirectory(dir=root) as out, stream_outputs(out, 2**30),
                  merge_device(device)):
                get_method(method).merge(pretrained, finetuned)
    seconds, used = time.perf_counter() - start, os.times()       # all this process's threads
    gpu = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None)
    # None for code older than the count (A/B runs of old commits through PYTHONPATH)
    hinted = getattr(READ_AHEAD, "hinted_bytes", None)
    system = used.system - cpu.system
    return {"seconds": seconds, "cpu_s": used.user - cpu.user + system, "system_s": system,
            "peak_gib": peak_gib(), "gpu_gib": gpu,
            "anon_gib": sampled.anon / 2**30, "file_gib": sampled.file / 2**30,
            "hinted_gib": None if hinted is None else hinted / 2**30}


def summarize(runs: list[dict]) -> dict:
    """One table row from repeated runs of one method: the median wall time and its range, the
    median CPU time and its system part, and the largest of each peak (a peak any run reached
    is memory the machine must have) and of the bytes hinted to the kernel for reading ahead."""
    seconds = sorted(run["seconds"] for run in runs)
    row = {"seconds": statistics.median(seconds), "low": seconds[0], "high": seconds[-1]}
    for keys, pick in ((("cpu_s", "system_s"), statistics.median),
                       (("peak_gib", "anon_gib", "file_gib", "gpu_gib", "hinted_gib"), max)):
        for key in keys:
            values = [run[key] for run in runs if run.get(key) is not None]
            row[key] = pick(values) if values else None
    return row


def seconds_text(row: dict, digits: int) -> str:
    """A summarized run's median seconds, with the range when repeated runs differ at
    ``digits`` decimals."""
    median, low, high = (f"{row[k]:.{digits}f}" for k in ("seconds", "low", "high"))
    return median + (f" ({low}–{high})" if low != high else "")


def print_header() -> None:
    print("| run | wall s | CPU s (system) | read GB/s | x read floor | x read + write floors "
          "| peak RSS GiB | peak anon GiB | peak file-mapped GiB | peak GPU GiB "
          "| read-ahead GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)


def print_row(label: str, row: dict, results: dict[int, list[dict]], runs: list[str],
              input_bytes: int) -> None:
    """One table row: wall time (the median, with its range over repeated runs), CPU time,
    throughput, ratios to the read floor and to the read and write floors (medians), and peaks."""
    floors = {name: summarize(results[runs.index(name)])["seconds"]
              for name in ("read", "write") if results[runs.index(name)]}
    method = label not in ("read", "read-float32", "write")
    both = sum(floors.values()) if len(floors) == 2 and method else None
    ratio, ratio_both = (f"{row['seconds'] / floor:.1f}" if floor else "–"
                         for floor in (floors.get("read"), both))
    anon, file, gpu, hinted = (f"{row[k]:.2f}" if row.get(k) is not None else "–"
                               for k in ("anon_gib", "file_gib", "gpu_gib", "hinted_gib"))
    throughput = "–" if label == "write" else f"{input_bytes / row['seconds'] / 1e9:.2f}"
    cpu = ("–" if row.get("cpu_s") is None
           else f"{row['cpu_s']:.1f} ({row['system_s']:.1f})")
    print(f"| {label} | {seconds_text(row, 1)} | {cpu} | {throughput} | {ratio} | {ratio_both} | "
          f"{row['peak_gib']:.2f} | {anon} | {file} | {gpu} | {hinted} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    parser.add_argument("--layers", type=int, default=None, help="first N decoder layers only")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--no-embeddings", action="store_true")
    parser.add_argument("--only-embeddings", action="store_true",
                        help="only the embedding and output head (the largest matrices)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shard-mb", type=int, default=1024)
    parser.add_argument("--methods", nargs="*", default=["ties", "dts-d"],
                        help="registry names, and svd-floor: the exact SVDs DTS needs alone")
    parser.add_argument("--mergekit", default=None, metavar="VENV",
                        help="also run mergekit's TIES from this virtual environment")
    parser.add_argument("--device", default="cpu", help="merge device (cuda: SVDs and "
                        "arithmetic on the GPU, inputs and outputs on the CPU)")
    parser.add_argument("--ties-held-mib", type=int, default=None,
                        help="TIES's memory for entries awaiting the majority sign (default "
                        "512; smaller shows a larger model's behaviour past it)")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                        help="run every worker in a memory cgroup of GIB GiB, page cache "
                        "included, as on a machine with that much memory (Linux, root)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the inputs from the page cache before every run, so each "
                        "reads them from the disk")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run the whole list N times, in rounds, and print medians")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "ROOT", "TASKS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, root, tasks = args.worker
        if method.startswith("mergekit:"):
            print(json.dumps(mergekit_worker(method.split(":", 1)[1], root, int(tasks))))
        else:
            print(json.dumps(worker(method, root, int(tasks), args.device,
                                    args.ties_held_mib)))
        return 0
    embeddings = ("without" if args.no_embeddings else "only" if args.only_embeddings
                  else "with")
    shape_of = shapes(args.size, args.layers, embeddings)
    dtype = getattr(torch, args.dtype)
    params = sum(torch.Size(s).numel() for s in shape_of.values())
    largest = max(torch.Size(s).numel() for s in shape_of.values())
    limited = (MemoryCgroup(int(args.memory_limit * 2**30)) if args.memory_limit
               else contextlib.nullcontext())
    # cached pages stay charged to whoever read them first: a limited run must read its own
    cold = args.cold or bool(args.memory_limit)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as root, limited as cgroup:
        start = time.perf_counter()
        synthesize(root, shape_of, args.tasks, dtype, args.shard_mb * 2**20)
        for name in ["pretrained", *[f"task{t}" for t in range(args.tasks)]]:
            model_config(args.size, args.layers).save_pretrained(os.path.join(root, name))
        os.sync()       # the inputs' write-back to disk would otherwise compete with the runs
        written = time.perf_counter() - start
        input_bytes = params * dtype.itemsize * (args.tasks + 1)
        what = {"with": f"{args.layers or 'all'} layers",
                "without": f"{args.layers or 'all'} layers, no embeddings",
                "only": "embeddings only"}[embeddings]
        print(f"# Qwen2.5-{args.size} shapes, {what}: {params:,} parameters "
              f"per model in {args.dtype}, {args.tasks} tasks + base = "
              f"{input_bytes / 2**30:.2f} GiB of input; largest tensor {largest:,} parameters "
              f"({largest * 4 / 2**30:.2f} GiB in float32); {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}; synthesized in {written:.0f} s")
        print(f"merge device: {args.device}" + ("" if args.ties_held_mib is None else
              f"; TIES holds {args.ties_held_mib} MiB of undecided entries in memory")
              + ("; inputs dropped from the page cache before every run" if cold else
                 "; inputs in the page cache")
              + (f"; every run limited to {args.memory_limit:g} GiB of memory, page cache "
                 "included" if args.memory_limit else ""))
        runs = ["read", "read-float32", "write", *args.methods]
        runs += [f"mergekit:{args.mergekit}"] if args.mergekit else []
        held = [] if args.ties_held_mib is None else ["--ties-held-mib", str(args.ties_held_mib)]

        def run(method: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, __file__, "--worker", method, root,
                                   str(args.tasks), "--device", args.device, *held],
                                  capture_output=True, text=True,
                                  preexec_fn=cgroup.join if cgroup else None)

        def label(method: str) -> str:
            return "mergekit ties (per-tensor trim)" if method.startswith("mergekit:") else method
        if args.repeat == 1:
            print_header()
        if not cold:
            run("read")     # untimed: the first read after writing was slower than the later
        results: dict[int, list[dict]] = {index: [] for index in range(len(runs))}
        for round_ in range(args.repeat):
            for index, method in enumerate(runs):
                if cold:
                    evict_inputs(root)
                out = run(method)
                if out.returncode:
                    print(f"{label(method)}: failed\n{out.stderr[-2000:]}", flush=True)
                    continue
                results[index].append(json.loads(out.stdout.strip().splitlines()[-1]))
                if args.repeat == 1:
                    print_row(label(method), summarize(results[index]), results, runs,
                              input_bytes)
                else:
                    print(f"# round {round_ + 1}/{args.repeat}: {label(method)} "
                          f"{results[index][-1]['seconds']:.2f} s", flush=True)
        if args.repeat > 1:
            print_header()
            for index, method in enumerate(runs):
                if results[index]:
                    print_row(label(method), summarize(results[index]), results, runs,
                              input_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

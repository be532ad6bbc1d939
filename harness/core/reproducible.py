"""Bitwise-reproducible computation on any x86-64 machine with the pinned packages.

What makes float results differ between two machines running the same code:

- **vectorized kernels chosen by CPU capability**: ATen picks AVX-512, AVX2 or plain kernels at
  run time, and a wider vector sums in another order (and draws ``randn`` differently);
- **thread-partitioned reductions**: each thread sums its own slice, so the thread count moves
  the rounding;
- **BLAS dispatch**: MKL picks its code path by CPU and by thread count;
- **oneDNN dispatch**, the same way, for the operations torch sends it.

:data:`PINNED_ENV` pins all four: ATen's portable kernels (``ATEN_CPU_CAPABILITY=default``, which
every x86-64 CPU runs), MKL's conditional numerical reproducibility mode
(``MKL_CBWR=COMPATIBLE``), one thread everywhere, oneDNN's baseline instruction set. These must be
set before torch is loaded, so pinned work runs in a child process (:func:`pinned_command`);
inside it :func:`pin_torch` also turns on torch's deterministic algorithms and turns oneDNN off.
Pinned work is slower (one thread, no wide vectors): builds pay it once, and the pinned figures
are in ``docs/performance.md``.
"""

from __future__ import annotations

import os
import platform
import sys

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "DNNL_MAX_CPU_ISA": "SSE41",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    "PYTHONHASHSEED": "0",
}
MARKER = "MERGE_HARNESS_PINNED"


def is_pinned() -> bool:
    """Whether this process runs with :data:`PINNED_ENV` (set before torch was loaded)."""
    return os.environ.get(MARKER) == "1" and all(os.environ.get(k) == v
                                                  for k, v in PINNED_ENV.items())


def pinned_environment(base: dict | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the pins and the marker set."""
    return {**(os.environ if base is None else base), **PINNED_ENV, MARKER: "1"}


def pinned_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run ``python -m module args...`` pinned."""
    return [sys.executable, "-m", module, *args], pinned_environment()


def pin_torch() -> None:
    """In a pinned process, after importing torch: one thread, deterministic algorithms, no
    oneDNN. Raises unless the environment was pinned before torch loaded."""
    if not is_pinned():
        raise RuntimeError("pin_torch() needs the pinned environment, set before torch loads: "
                           "run the work through harness.core.reproducible.pinned_command")
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:                # set once only, before any parallel work
        pass
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False


def machine_details() -> dict:
    """What this machine is, stored with every artifact built on it."""
    import torch

    flags: list[str] = []
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = [x for x in line.split(":", 1)[1].split()
                             if x.startswith(("avx", "sse4", "fma", "amx"))]
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": model, "cpu_flags": sorted(set(flags)),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "pinned": is_pinned(),
            "python": platform.python_version()}

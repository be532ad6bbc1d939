"""Fused elementwise merge kernels (Task Arithmetic, Weight Averaging): one pass over memory per block instead of one per torch
operation, with torch's bits.

The kernels live in ``fused.c``, built at install time as the optional extension module
``harness.core._fused`` and called here through ctypes (which releases the GIL, so the engine's
block threads run them in parallel). Where the module was not built (no C compiler at install
time) or ``MERGE_HARNESS_NO_FUSED=1`` is set, :func:`available` is false and merges take their
torch rule: the same bits, more passes over memory.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

DISABLE = "MERGE_HARNESS_NO_FUSED"
MAX_TASKS = 64


@functools.lru_cache(maxsize=1)
def _library():
    """The built kernels, or None."""
    try:
        spec = importlib.util.find_spec("harness.core._fused")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    kernel = library.task_arithmetic_f32
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
    kernel.restype = ctypes.c_int
    kernel = library.weight_average_f32
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_int64, ctypes.c_void_p]
    kernel.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the fused kernels can run (built, and not turned off by ``MERGE_HARNESS_NO_FUSED``)."""
    return os.environ.get(DISABLE) != "1" and _library() is not None


def fits(out: Tensor, *inputs: Tensor) -> bool:
    """Whether the kernels take these tensors: float32, on the CPU, contiguous, one size, at
    most :data:`MAX_TASKS` tasks besides the pretrained block."""
    return (len(inputs) - 1 <= MAX_TASKS and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
        and t.numel() == out.numel() for t in (out, *inputs)))


def _pointers(sources: Sequence[Tensor]):
    count = len(sources)
    return count, (ctypes.c_void_p * count)(*[s.data_ptr() for s in sources]), \
        (ctypes.c_int64 * count)()


def _checked(status: int, what: str, count: int) -> None:
    if status != 0:
        raise ValueError(f"the fused {what} kernel takes 1 to {MAX_TASKS} tasks, not {count}")


def task_arithmetic(out: Tensor, theta0: Tensor, sources: Sequence[Tensor], lam: float
                    ) -> list[int]:
    """``out = theta0 + lam * sum_t (sources[t] - theta0)`` with the bits of
    :func:`harness.methods.task_arithmetic.task_arithmetic` on the task vectors (float32, the
    tasks summed in order), reading every input once; returns per task the number of entries
    that differ from ``theta0``. The caller checks :func:`available` and :func:`fits`."""
    count, pointers, changed = _pointers(sources)
    _checked(_library().task_arithmetic_f32(out.data_ptr(), theta0.data_ptr(), pointers, count,
                                            out.numel(), ctypes.c_float(lam), changed),
             "Task Arithmetic", count)
    return list(changed)


def weight_average(out: Tensor, theta0: Tensor, sources: Sequence[Tensor]) -> list[int]:
    """``out = mean_t sources[t]`` with the bits of
    :func:`harness.methods.weight_averaging.weight_average` (float64 sum in task order,
    divided, rounded to float32 once), reading every input once; returns per task the number of
    entries that differ from ``theta0``."""
    count, pointers, changed = _pointers(sources)
    _checked(_library().weight_average_f32(out.data_ptr(), theta0.data_ptr(), pointers, count,
                                           out.numel(), changed), "Weight Averaging", count)
    return list(changed)

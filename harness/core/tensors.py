"""State dicts and the tensor algebra every merge shares: float32 casts, task vectors, the merge
device, and row blocks with their reusable scratch buffers.

A state dict is any ``Mapping[str, Tensor]``; it may be lazy (a memory-mapped safetensors file),
so everything here works key by key and never assumes a ``dict``.

Inside ``with merge_device("cuda"):`` task vectors (and so every method's arithmetic, SVDs
included) are computed on that device one key at a time, while the inputs stay where they are
(memory-mapped on the CPU) and every output is stored back on the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from harness.core.errors import MergeInputError

StateDict = Mapping[str, Tensor]


def is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def to_float32(t: Tensor) -> Tensor:
    """A float32 view or copy of ``t``; never the caller's tensor when a cast is needed."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


_DEVICE: contextvars.ContextVar[torch.device] = contextvars.ContextVar(
    "merge_harness_device", default=torch.device("cpu"))


@contextlib.contextmanager
def merge_device(device: str | torch.device):
    """Within the block, merges compute on ``device`` (tensors streamed in key by key, results
    stored on the CPU)."""
    token = _DEVICE.set(torch.device(device))
    try:
        yield _DEVICE.get()
    finally:
        _DEVICE.reset(token)


def on_merge_device(t: Tensor) -> Tensor:
    """``t`` on the current merge device (itself when it is already there)."""
    return t.to(_DEVICE.get())


def task_vector(pretrained: Tensor, finetuned: Tensor, out: Tensor | None = None) -> Tensor:
    """``finetuned - pretrained`` in float32 on the merge device (a new tensor, or written into
    the float32 ``out``; inputs are untouched; each input crosses to the device in its own
    dtype and is cast to float32 before the subtraction, whatever that dtype)."""
    finetuned, pretrained = on_merge_device(finetuned), to_float32(on_merge_device(pretrained))
    if out is None:
        return to_float32(finetuned) - pretrained
    if finetuned.dtype == torch.float32:
        return torch.sub(finetuned, pretrained, out=out)
    # another dtype: cast, then subtract (a mixed-dtype subtraction runs 2-4 times slower)
    return out.copy_(finetuned).sub_(pretrained)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def cast_like(value: Tensor, dtype: torch.dtype) -> Tensor:
    return value if value.dtype == dtype else value.to(dtype)


def store_rows(value: Tensor, rows, block: Tensor) -> None:
    """Write the merge-device ``block`` into ``value[rows]`` (an output on the CPU), cast to
    ``value``'s dtype. From another device the block is cast there (a crossing that casts would
    cross in float32 and cast on the CPU) and lands in a temporary that the CPU's threads copy
    into the output: crossing straight into it would leave one thread to fault in all of the
    output's fresh pages."""
    if block.device == value.device:
        value[rows].copy_(block)
    else:
        value[rows].copy_(cast_like(block, value.dtype).cpu())


def check_finite(t: Tensor, key: str, model: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise MergeInputError(f"key {key!r} of {model} contains {bad} values")


def count_nonzero(t: Tensor, scratch: Tensor) -> int:
    """The exact number of non-zero entries of a float32 tensor, counted on its bit patterns
    shifted left by one into the int32 ``scratch`` (so -0.0 counts as zero), which is cheaper on
    the CPU than counting the floats themselves."""
    shifted = torch.bitwise_left_shift(t.view(torch.int32), 1, out=scratch)
    return int(torch.count_nonzero(shifted))


def surely_finite(t: Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf, by one cheap reduction: any NaN or Inf makes the sum
    non-finite. A False (possibly a finite overflow) calls for the exact check."""
    return bool(torch.isfinite(t.sum()))


class BlockBuffers:
    """Named scratch tensors for row blocks, reused from block to block (and key to key): a
    fresh large allocation is fresh pages for the kernel to fault in and zero, which cost as
    much as the arithmetic on them. A view is valid until the same name is asked for again."""

    def __init__(self) -> None:
        self._flat: dict[str, Tensor] = {}

    def view(self, name: str, like: Tensor, dtype: torch.dtype = torch.float32,
             count: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """Buffer ``name`` shaped like ``like`` (``(count, *like.shape)`` with ``count``), on its
        device or ``device``; grown when a larger block asks."""
        shape = tuple(like.shape) if count is None else (count, *like.shape)
        device = like.device if device is None else torch.device(device)
        n = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n or flat.device != device:
            flat = self._flat[name] = torch.empty(n, dtype=dtype, device=device)
        return flat[:n].view(shape)

    def float32(self, name: str, t: Tensor) -> Tensor:
        """``t`` in float32 on the merge device: ``t`` itself when it already is, else a copy
        in buffer ``name``."""
        t = on_merge_device(t)
        return t if t.dtype == torch.float32 else self.view(name, t).copy_(t)


CHUNK_BYTES = 2**23     # float32 bytes of one row block of all tasks' task vectors on the CPU


DEVICE_CHUNK_BYTES = 2**25      # the same on another merge device (a GPU)


def row_chunks(shape: tuple[int, ...], tasks: int) -> list:
    """Row blocks of a tensor such that all tasks' float32 vectors of one block stay near
    ``CHUNK_BYTES``, for merge rules that are elementwise across tasks (blocks then give the
    same bits as whole keys); a 0-d tensor is one block.

    On the CPU, 8 MiB blocks keep a block's temporaries (its task vectors, theta_0, scratch) in
    the last-level cache from one operation to the next, while larger blocks spill it and much
    smaller ones pay per-operation overhead. A GPU takes 32 MiB blocks: fewer transfers and
    kernel launches.
    """
    if not shape:
        return [...]
    row = max(1, math.prod(shape[1:]))
    budget = CHUNK_BYTES if _DEVICE.get().type == "cpu" else DEVICE_CHUNK_BYTES
    step = max(1, budget // (4 * tasks * row))
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def current_device() -> torch.device:
    """The device merges compute on in this context (:func:`merge_device`)."""
    return _DEVICE.get()


class PrefixedState(Mapping):
    """State dicts seen under new key names, each tensor read only when asked for (so a model
    larger than memory can be written key by key): ``PrefixedState(("bert.", backbone),
    ("classifier.", head))`` holds ``bert.<k>`` for every key of ``backbone`` and so on."""

    def __init__(self, *parts: tuple[str, Mapping]) -> None:
        self._parts = parts

    def __getitem__(self, key: str) -> Tensor:
        for prefix, part in self._parts:
            if key.startswith(prefix) and key[len(prefix):] in part:
                return part[key[len(prefix):]]
        raise KeyError(key)

    def __iter__(self):
        for prefix, part in self._parts:
            for key in part:
                yield prefix + key

    def __len__(self) -> int:
        return sum(len(part) for _, part in self._parts)

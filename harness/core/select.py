"""Exact order statistics of non-negative float32 values by radix selection on their bits:
histograms instead of sorts, so a whole model's k-th magnitude takes two or three streaming
passes and a small, fixed memory (TIES), and an in-memory tensor's a few elementwise passes
(T-Switch)."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_BINS = 1 << 16
NON_FINITE_HALF_BIN = 2 * 0x7F80   # first half-bin of non-finite magnitudes (exponent all ones)


BATCH_BELOW = 1 << 14   # smaller blocks are histogrammed in batches (see StreamingKthSmallest)


class StreamingKthSmallest:
    """The exact k-th smallest (1-indexed) of non-negative float32 values, seen in one or two
    passes.

    Non-negative float32 bit patterns order like the values. Pass 1 counts each value in one of
    two half-bins per high-16-bit pattern ``h``, which keep that order: the value exactly
    ``h << 16`` (low bits zero), then the values strictly inside the bin. When the k-th value
    falls on such an edge, pass 1 has found it; this is the usual case for bfloat16 models,
    whose task vectors carry few mantissa bits. Otherwise pass 2 counts the low 16 bits of the
    values inside the k-th value's bin. Memory: two small histograms, whatever the model, kept
    on the values' device: on a GPU, adding each block's counts to a histogram on the CPU is a
    CPU operation between GPU waits, after which OpenMP's idle threads spin.

    A histogram costs its bins (131,072 in pass 1, 65,536 in pass 2) whatever the block's size,
    so blocks under ``BATCH_BELOW`` values wait in a queue and are counted together once the
    queue holds that many: a model of thousands of small keys costs what its entries cost.

    Blocks may be counted from several threads at once: the counts are integers, so their
    order does not matter, and adding them to the histograms holds a lock.
    """

    def __init__(self) -> None:
        self.high = torch.zeros(2 * _BINS, dtype=torch.int64)
        self.low = torch.zeros(_BINS, dtype=torch.int64)
        self.bin: int | None = None
        self.on_edge = False
        self.rank = 0
        self._queued: dict[str, list[Tensor]] = {"high": [], "low": []}
        self._queued_values = {"high": 0, "low": 0}
        self._lock = threading.RLock()

    def add_high(self, values: Tensor, *, overwrite: bool = False,
                 scratch: Tensor | None = None) -> tuple[int, int]:
        """Pass 1: count ``values``; returns how many of them are +0.0 and how many are not
        finite. With ``overwrite``, ``values`` is worked in (destroyed); ``scratch``, an int32
        tensor of its size, spares one fresh allocation."""
        bits = values.reshape(-1).view(torch.int32)
        high = torch.bitwise_right_shift(bits, 16, out=scratch)
        ceiling = (bits if overwrite else bits.clone()).add_(0xFFFF).bitwise_right_shift_(16)
        half_bin = high.add_(ceiling)    # 2h on the edge h << 16, 2h + 1 inside bin h
        if half_bin.numel() < BATCH_BELOW:
            zeros = int(torch.count_nonzero(half_bin == 0))
            nonfinite = int(torch.count_nonzero(half_bin >= NON_FINITE_HALF_BIN))
            self._queue("high", half_bin.clone())
            return zeros, nonfinite
        counts = torch.bincount(half_bin, minlength=2 * _BINS)
        self._add("high", counts)
        return int(counts[0]), int(counts[NON_FINITE_HALF_BIN:].sum())

    def _queue(self, name: str, indices: Tensor) -> None:
        with self._lock:
            self._queued[name].append(indices)
            self._queued_values[name] += indices.numel()
            if self._queued_values[name] >= BATCH_BELOW:
                self._flush(name)

    def _flush(self, name: str) -> None:
        with self._lock:
            queued = self._queued[name]
            if queued:
                bins = 2 * _BINS if name == "high" else _BINS
                self._add(name, torch.bincount(torch.cat(queued), minlength=bins))
                queued.clear()
                self._queued_values[name] = 0

    def _add(self, name: str, counts: Tensor) -> None:
        with self._lock:
            total = getattr(self, name).to(counts.device)
            total += counts
            setattr(self, name, total)

    @property
    def zeros(self) -> int:
        """How many of the values counted so far are exactly +0.0."""
        self._flush("high")
        return int(self.high[0])

    def choose_bin(self, k: int) -> None:
        self._flush("high")
        cum = self.high.cumsum(0)
        half_bin = int(torch.searchsorted(cum, k))
        self.bin, self.on_edge = half_bin // 2, half_bin % 2 == 0
        self.rank = k - (int(cum[2 * self.bin - 1]) if self.bin > 0 else 0)

    @property
    def needs_low(self) -> bool:
        """Whether :meth:`value` needs pass 2 (:meth:`add_low`)."""
        return not self.on_edge

    def add_low(self, values: Tensor, scratch: tuple[Tensor, Tensor] | None = None) -> None:
        """Pass 2: count the low bits of ``values`` inside the chosen bin. ``scratch``: an int32
        and a bool tensor of ``values``' size to work in (no fresh allocation per call)."""
        bits = values.reshape(-1).view(torch.int32)
        if scratch is None:
            scratch = torch.empty_like(bits), torch.empty_like(bits, dtype=torch.bool)
        shifted, in_bin = scratch
        torch.eq(torch.bitwise_right_shift(bits, 16, out=shifted), self.bin, out=in_bin)
        inside = bits[in_bin] & 0xFFFF
        if bits.numel() < BATCH_BELOW:
            self._queue("low", inside)
        else:
            self._add("low", torch.bincount(inside, minlength=_BINS))

    def value(self) -> float:
        self._flush("low")
        low = 0 if self.on_edge else int(torch.searchsorted(self.low.cumsum(0), self.rank))
        word = torch.tensor([(self.bin << 16) | low], dtype=torch.int32)
        return float(word.view(torch.float32))

"""Exact order statistics of non-negative float32 values by radix selection on their bits:
histograms instead of sorts, so a whole model's k-th magnitude takes two or three streaming
passes and a small, fixed memory (TIES), and an in-memory tensor's a few elementwise passes
(T-Switch)."""

from __future__ import annotations

import torch
from torch import Tensor

_BINS = 1 << 16
NON_FINITE_HALF_BIN = 2 * 0x7F80   # first half-bin of non-finite magnitudes (exponent all ones)


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
    CPU operation between GPU waits, after which OpenMP's idle threads spin (about 9 ms each on
    this project's machine).
    """

    def __init__(self) -> None:
        self.high = torch.zeros(2 * _BINS, dtype=torch.int64)
        self.low = torch.zeros(_BINS, dtype=torch.int64)
        self.bin: int | None = None
        self.on_edge = False
        self.rank = 0

    def add_high(self, values: Tensor, *, overwrite: bool = False,
                 scratch: Tensor | None = None) -> Tensor:
        """Pass 1: count ``values``; returns these values' counts per half-bin, on their
        device. With ``overwrite``, ``values`` is worked in (destroyed); ``scratch``, an int32
        tensor of its size, spares one fresh allocation."""
        bits = values.reshape(-1).view(torch.int32)
        high = torch.bitwise_right_shift(bits, 16, out=scratch)
        ceiling = (bits if overwrite else bits.clone()).add_(0xFFFF).bitwise_right_shift_(16)
        half_bin = high.add_(ceiling)    # 2h on the edge h << 16, 2h + 1 inside bin h
        counts = torch.bincount(half_bin, minlength=2 * _BINS)
        self.high = self.high.to(counts.device)
        self.high += counts
        return counts

    @property
    def zeros(self) -> int:
        """How many of the values counted so far are exactly +0.0."""
        return int(self.high[0])

    def choose_bin(self, k: int) -> None:
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
        counts = torch.bincount(inside, minlength=_BINS)
        self.low = self.low.to(counts.device)
        self.low += counts

    def value(self) -> float:
        low = 0 if self.on_edge else int(torch.searchsorted(self.low.cumsum(0), self.rank))
        word = torch.tensor([(self.bin << 16) | low], dtype=torch.int32)
        return float(word.view(torch.float32))

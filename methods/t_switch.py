"""T-Switch (Qi et al., CVPR 2025, "Less is more: efficient model merging with binary task
switch"): per tensor, keep the largest entries of each sign and store them as ``alpha * sign``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from harness.core.bits import pack_bits, unpack_bits
from harness.core.select import StreamingKthSmallest
from harness.engine.codecs import CodecError, Dense, PackedCodec, expect_tensor
from harness.engine.method import hp, require
from harness.engine.templates import PayloadMerge


@dataclass
class Ternary(PackedCodec):
    """T-Switch's ``alpha * b`` with ``b`` in {-1, 0, +1}: 2 bits per entry and one float32."""

    codes: Tensor  # packed: 0 absent, 1 positive, 2 negative
    alpha: Tensor  # float32 scalar
    shape: tuple[int, ...]
    kind: ClassVar[str] = "ternary"

    def decode(self, shared=None):
        ids = unpack_bits(self.codes, 2, math.prod(self.shape)).to(torch.int64)
        table = torch.stack([torch.zeros_like(self.alpha), self.alpha, -self.alpha])
        return table[ids].reshape(self.shape)

    def tensors(self):
        return {"codes": self.codes, "alpha": self.alpha}

    @classmethod
    def from_stored(cls, meta, tensors):
        kind = cls.kind
        shape = cls.stored_shape(meta, tensors, {"codes", "alpha"}, "codes", 2)
        expect_tensor(tensors["alpha"], kind, "alpha", torch.float32, ())
        if _max_code(tensors["codes"], math.prod(shape)) > 2:
            raise CodecError(f"{kind} codec: a code is 3, which no ternary value has")
        return cls(tensors["codes"], tensors["alpha"], shape)


def _max_code(packed: Tensor, numel: int) -> int:
    """The largest of the first ``numel`` 2-bit codes in ``packed``."""
    return int(unpack_bits(packed, 2, numel).max()) if numel else 0


SELECT_BY_HISTOGRAM = 2**16     # entries from which a radix select beats kthvalue


def largest_of_sign(tau: Tensor, sign: int, k: float) -> Tensor:
    """Among the entries of ``tau`` with ``sign`` (+1 or -1), the ``int(n * (1 - k))`` of largest
    magnitude (ties at the smallest kept magnitude kept too); where that count is 0, all ``n``.

    Their magnitudes, with +0.0 elsewhere, have the kept ones from the ``(numel - keep + 1)``-th
    smallest up: ``kthvalue`` on small tensors, on large ones an exact radix select whose first
    histogram also counts the zeros (:class:`harness.core.select.StreamingKthSmallest`), several
    times faster there.
    """
    magnitude = torch.clamp(tau * sign, min=0).abs_().reshape(-1)     # abs_: -0.0 -> +0.0
    total = magnitude.numel()
    selector = None
    if total <= SELECT_BY_HISTOGRAM:
        present = int(torch.count_nonzero(magnitude))
    else:
        selector = StreamingKthSmallest()
        selector.add_high(magnitude)
        present = total - selector.zeros
    keep = int(present * (1 - k))
    if keep == 0:
        return (magnitude > 0).reshape(tau.shape)
    if selector is None:
        threshold = torch.kthvalue(magnitude, total - keep + 1).values
    else:
        selector.choose_bin(total - keep + 1)
        if selector.needs_low:
            selector.add_low(magnitude)
        threshold = selector.value()
    return (magnitude >= threshold).reshape(tau.shape)


def t_switch_codes(tau: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """Ternary codes (0 absent, 1 positive, 2 negative) and the scale ``alpha`` of one tensor."""
    keep_pos = largest_of_sign(tau, 1, k)
    keep_neg = largest_of_sign(tau, -1, k)
    kept = tau * (keep_pos | keep_neg)
    signs = torch.sign(kept)
    b_norm = torch.linalg.vector_norm(signs)
    alpha = torch.linalg.vector_norm(kept) / b_norm if float(b_norm) > 0 else b_norm * 0
    codes = keep_pos.to(torch.uint8) + 2 * keep_neg.to(torch.uint8)
    return codes, alpha.to(torch.float32)


def t_switch_encode(tau: Tensor, k: float) -> Dense | Ternary:
    """The stored form of one task-vector tensor: 0-d tensors exactly, others as ``alpha * b``."""
    if tau.dim() == 0:
        return Dense(tau.clone())
    codes, alpha = t_switch_codes(tau, k)
    return Ternary(pack_bits(codes, 2), alpha, tuple(tau.shape))


@dataclass(frozen=True)
class TSwitch(PayloadMerge):
    """T-Switch, the authors' per-tensor, per-sign rule with one scale per tensor.

    ``k`` is the fraction dropped (0.6 vision, 0.7 language). Per sign the largest
    ``int(n * (1 - k))`` entries are kept; where that count is 0 every entry of that sign is
    kept, as the authors' code does. ``alpha = ||tau_kept|| / ||b||`` (0 for an all-zero tensor,
    where the authors' RoBERTa code gives NaN). Payload: 2 bits per entry (presence + sign)
    plus one float32 per tensor. Unseen tasks get the pretrained model (paper, appendix B.2).
    """

    name = "t-switch"
    display_name = "T-Switch"
    family = "binary"
    year = 2025
    k: float = hp(0.6, "fraction of each sign's entries dropped per tensor")

    def check(self):
        require(0 <= self.k < 1, self.name, "k", f"must be in [0, 1), got {self.k}")

    def encoder(self, spec, plan):
        return lambda key, tau: t_switch_encode(tau, self.k)

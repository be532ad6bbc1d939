"""Bit-packing of integer codes (1, 2, 4 or 8 bits per code) and of where a tensor's exact zeros
are: what every stored payload is made of, so AMR counts exactly the bytes written."""

from __future__ import annotations

import functools
import math

import numpy
import torch
from torch import Tensor

def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy once packed."""
    return math.ceil(numel * bits / 8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (bits 1, 2, 4 or 8) into a flat uint8 tensor."""
    packer = BitPacker(codes.numel(), bits, codes.device)
    packer.add(codes)
    return packer.finish()


class BitPacker:
    """Packs codes that arrive in order, block by block, into the bytes :func:`pack_bits` gives
    for all of them at once, so a whole tensor's codes never need to be held unpacked.

    Works in uint8 throughout: one byte of scratch per code of a block, not an int32 copy.
    """

    def __init__(self, numel: int, bits: int, device: torch.device | str = "cpu") -> None:
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"cannot pack {bits}-bit codes")
        self.bits, self.per_byte = bits, 8 // bits
        self.packed = torch.empty(packed_nbytes(numel, bits), dtype=torch.uint8, device=device)
        self.filled = 0
        self.carry = torch.empty(0, dtype=torch.uint8, device=device)

    def add(self, codes: Tensor) -> None:
        """Append ``codes`` (any integer or bool dtype) after those added before."""
        if codes.dtype != torch.bool and codes.numel() and int(codes.max()) >= (1 << self.bits):
            raise ValueError(f"a code does not fit in {self.bits} bits")
        flat = codes.reshape(-1).to(torch.uint8)
        if self.carry.numel():
            flat = torch.cat([self.carry, flat])
        whole = flat.numel() - flat.numel() % self.per_byte
        self._write(flat[:whole])
        self.carry = flat[whole:].clone()

    def finish(self) -> Tensor:
        """The packed bytes; a last partial byte is padded with zero codes."""
        if self.carry.numel():
            self._write(torch.cat([self.carry, self.carry.new_zeros(self.per_byte
                                                                   - self.carry.numel())]))
            self.carry = self.carry[:0]
        if self.filled != self.packed.numel():
            raise ValueError(f"{self.filled} packed bytes written of {self.packed.numel()}")
        return self.packed

    def _write(self, flat: Tensor) -> None:
        groups = flat.view(-1, self.per_byte)
        out = self.packed[self.filled:self.filled + groups.shape[0]]
        if out.numel() != groups.shape[0]:
            raise ValueError(f"more codes than the {self.packed.numel()} bytes allotted hold")
        if self.bits == 1 and flat.device.type == "cpu":    # numpy's packbits: many times faster
            out.copy_(torch.from_numpy(numpy.packbits(flat.numpy(), bitorder="little")))
        else:
            out.copy_(groups[:, 0])
            for slot in range(1, self.per_byte):
                out.bitwise_or_(groups[:, slot] << (slot * self.bits))
        self.filled += groups.shape[0]


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as uint8."""
    per_byte = 8 // bits
    if packed.device.type == "cpu":     # numpy, no int32 temporaries: several times faster
        if bits == 1:
            codes = numpy.unpackbits(packed.numpy(), count=numel, bitorder="little")
        else:                           # each byte looks up its codes, read as one wide word
            codes = _unpack_table(bits).take(packed.numpy()).view(numpy.uint8)[:numel]
        return torch.from_numpy(codes)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


@functools.cache
def _unpack_table(bits: int) -> numpy.ndarray:
    """Entry ``b``: the ``8 // bits`` codes packed in byte ``b`` (first code first, one byte
    each), as one little-endian word."""
    shifts = numpy.arange(8 // bits) * bits
    codes = ((numpy.arange(256)[:, None] >> shifts) & ((1 << bits) - 1)).astype(numpy.uint8)
    return codes.view(f"<u{8 // bits}").reshape(256)


def zero_storage_nbytes(numel: int, zeros: int) -> int:
    """Bytes to store where a tensor's exact zeros are: a 1-bit mask or int32 positions."""
    if zeros == 0:
        return 0
    return min(packed_nbytes(numel, 1), 4 * zeros)


def store_zeros(zero_mask: Tensor) -> tuple[Tensor | None, str | None]:
    """The cheaper of a packed mask and int32 positions for a boolean zero mask."""
    flat = zero_mask.reshape(-1)
    count = int(torch.count_nonzero(flat))
    if count == 0:
        return None, None
    if 4 * count < packed_nbytes(flat.numel(), 1):
        return torch.nonzero(flat).reshape(-1).to(torch.int32), "positions"
    return pack_bits(flat, 1), "mask"

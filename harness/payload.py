"""Stored per-task payloads: bit-packing and the codecs that decode one tensor's delta.

Every codec knows the tensors it stores (``tensors()``), a little JSON metadata (``meta()``), how
many bytes it occupies (``nbytes``) and how to decode itself to a float32 delta. Personalized
merge results are made of these, so AMR counts exactly what is written to disk.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy
import torch
from torch import Tensor

FORMAT_VERSION = 2     # of stored results: 2 protects the manifest and binds each file


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


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class CodecError(ValueError):
    """A stored codec whose metadata and tensors do not fit together (a damaged or crafted
    result): refused when the result is loaded, before anything is decoded."""


MAX_DIMS = 16


def stored_shape(meta: dict, kind: str) -> tuple[int, ...]:
    """``meta["shape"]`` as a shape, or :class:`CodecError`."""
    shape = meta.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or any(type(s) is not int or s < 0 for s in shape)):
        raise CodecError(f"{kind} codec: shape {shape!r} is not a list of non-negative integers")
    return tuple(shape)


def expect_meta(meta: dict, kind: str, keys: set[str]) -> None:
    if not isinstance(meta, dict) or set(meta) != keys:
        found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise CodecError(f"{kind} codec: metadata fields {found}, expected {sorted(keys)}")


def expect_tensors(tensors: dict[str, Tensor], kind: str, required: set[str],
                   optional: set[str] = frozenset()) -> None:
    names = set(tensors)
    if not required <= names or not names <= required | optional:
        raise CodecError(f"{kind} codec: stored tensors {sorted(names)}, expected "
                         f"{sorted(required)}" + (f" and optionally {sorted(optional)}"
                                                  if optional else ""))


def expect_tensor(tensor: Tensor, kind: str, name: str, dtype: torch.dtype,
                  shape: tuple[int, ...] | None = None) -> None:
    if tensor.dtype != dtype or (shape is not None and tuple(tensor.shape) != tuple(shape)):
        want = f"{dtype}" + (f" of shape {tuple(shape)}" if shape is not None else "")
        raise CodecError(f"{kind} codec: tensor {name!r} is {tensor.dtype} of shape "
                         f"{tuple(tensor.shape)}, expected {want}")


def expect_packed(tensor: Tensor, kind: str, name: str, numel: int, bits: int) -> None:
    expect_tensor(tensor, kind, name, torch.uint8, (packed_nbytes(numel, bits),))


class Codec:
    """One tensor's stored delta; every codec has a ``shape``, that of the decoded delta."""

    kind: ClassVar[str]

    def decode(self, shared: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def meta(self) -> dict:
        return {}

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def to(self, device: torch.device | str) -> Codec:
        """This codec with every tensor (nested codecs included) on ``device``; it decodes
        there."""
        moved = {f.name: value.to(device) for f in fields(self)
                 if isinstance(value := getattr(self, f.name), (Tensor, Codec))}
        return replace(self, **moved)

    def cpu(self) -> Codec:
        """This codec on the CPU, for storing."""
        return self.to("cpu")

    @classmethod
    def from_stored(cls, meta: dict, tensors: dict[str, Tensor]) -> Codec:
        """The codec from its stored metadata and tensors; raises :class:`CodecError` unless
        they fit together exactly (names, dtypes, sizes, ranges)."""
        raise NotImplementedError


@dataclass
class Dense(Codec):
    """A delta stored as it is, in float32."""

    values: Tensor
    kind: ClassVar[str] = "dense"

    def decode(self, shared=None):
        return self.values

    def tensors(self):
        return {"values": self.values}

    @property
    def shape(self):
        return tuple(self.values.shape)

    @classmethod
    def from_stored(cls, meta, tensors):
        expect_meta(meta, cls.kind, set())
        expect_tensors(tensors, cls.kind, {"values"})
        expect_tensor(tensors["values"], cls.kind, "values", torch.float32)
        return cls(tensors["values"])


@dataclass
class GroupCode(Codec):
    """DTS's 4-group code: each entry is ``sign * scale`` of its group, at 2 bits per entry.

    Group ids: 0 positive-high, 1 positive-low, 2 negative-high, 3 negative-low. ``scales`` has
    one row of 4 per grouped vector (a single row when the whole tensor is one group set).
    Exact zeros are stored apart, as a packed 1-bit mask or int32 positions.
    """

    codes: Tensor            # packed 2-bit group ids
    scales: Tensor           # float32 (rows, 4)
    shape: tuple[int, ...]
    grouped_dim: int | None  # None: groups over the whole tensor; else one group set per slice
    zeros: Tensor | None = None
    zeros_as: str | None = None  # "mask" | "positions"
    kind: ClassVar[str] = "groups"

    def decode(self, shared=None):
        n = math.prod(self.shape)
        ids = unpack_bits(self.codes, 2, n).to(torch.int64)
        signs = torch.tensor([1.0, 1.0, -1.0, -1.0], device=self.scales.device)
        table = self.scales * signs
        rows = table.shape[0]
        if self.grouped_dim is None:
            flat = table[0][ids]
            out = flat.reshape(self.shape)
        else:
            moved = _moved_shape(self.shape, self.grouped_dim)
            flat = torch.gather(table, 1, ids.view(rows, -1))
            out = flat.reshape(moved).movedim(0, self.grouped_dim)
        out = out.contiguous().reshape(-1)
        if self.zeros is not None:
            if self.zeros_as == "mask":
                out[unpack_bits(self.zeros, 1, n).bool()] = 0.0
            else:
                out[self.zeros.to(torch.int64)] = 0.0
        return out.reshape(self.shape)

    def tensors(self):
        out = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def meta(self):
        return {"shape": list(self.shape), "grouped_dim": self.grouped_dim,
                "zeros_as": self.zeros_as}

    @classmethod
    def from_stored(cls, meta, tensors):
        kind = cls.kind
        expect_meta(meta, kind, {"shape", "grouped_dim", "zeros_as"})
        shape, dim, zeros_as = stored_shape(meta, kind), meta["grouped_dim"], meta["zeros_as"]
        if dim is not None and (type(dim) is not int or not 0 <= dim < len(shape)):
            raise CodecError(f"{kind} codec: grouped_dim {dim!r} is not a dimension of {shape}")
        if zeros_as not in (None, "mask", "positions"):
            raise CodecError(f"{kind} codec: zeros_as {zeros_as!r} is not mask or positions")
        expect_tensors(tensors, kind, {"codes", "scales"} | ({"zeros"} if zeros_as else set()))
        n = math.prod(shape)
        expect_packed(tensors["codes"], kind, "codes", n, 2)
        rows = 1 if dim is None else shape[dim]
        expect_tensor(tensors["scales"], kind, "scales", torch.float32, (rows, 4))
        zeros = tensors.get("zeros")
        if zeros_as == "mask":
            expect_packed(zeros, kind, "zeros", n, 1)
        elif zeros_as == "positions":
            expect_tensor(zeros, kind, "zeros", torch.int32)
            if zeros.dim() != 1 or (zeros.numel() and not (0 <= int(zeros.min())
                                                           and int(zeros.max()) < n)):
                raise CodecError(f"{kind} codec: zero positions outside the {n} entries")
        return cls(tensors["codes"], tensors["scales"], shape, dim, zeros, zeros_as)


def _moved_shape(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    rest = [s for i, s in enumerate(shape) if i != dim]
    return (shape[dim], *rest)


def store_zeros(zero_mask: Tensor) -> tuple[Tensor | None, str | None]:
    """The cheaper of a packed mask and int32 positions for a boolean zero mask."""
    flat = zero_mask.reshape(-1)
    count = int(torch.count_nonzero(flat))
    if count == 0:
        return None, None
    if 4 * count < packed_nbytes(flat.numel(), 1):
        return torch.nonzero(flat).reshape(-1).to(torch.int32), "positions"
    return pack_bits(flat, 1), "mask"


@dataclass
class LowRank(Codec):
    """``U diag(S) V`` with U and V stored by their own codecs and S in float32."""

    u: Codec
    s: Tensor
    v: Codec
    kind: ClassVar[str] = "lowrank"

    def decode(self, shared=None):
        return (self.u.decode() * self.s) @ self.v.decode()

    def tensors(self):
        out = {"s": self.s}
        out.update({f"u.{k}": t for k, t in self.u.tensors().items()})
        out.update({f"v.{k}": t for k, t in self.v.tensors().items()})
        return out

    def meta(self):
        return {"u": {"kind": self.u.kind, **self.u.meta()},
                "v": {"kind": self.v.kind, **self.v.meta()}}

    @property
    def shape(self):
        return (self.u.shape[0], self.v.shape[1])

    @classmethod
    def from_stored(cls, meta, tensors):
        kind = cls.kind
        expect_meta(meta, kind, {"u", "v"})
        unknown = [k for k in tensors if k != "s" and not k.startswith(("u.", "v."))]
        if unknown or "s" not in tensors:
            raise CodecError(f"{kind} codec: stored tensors {sorted(tensors)}, expected s and "
                             "the u. and v. factors'")
        parts = {}
        for name in ("u", "v"):
            factor = meta[name]
            inner = factor.get("kind") if isinstance(factor, dict) else None
            if inner not in CODECS or CODECS[inner] is LowRank:
                raise CodecError(f"{kind} codec: factor {name} has kind {inner!r}")
            sub = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
            parts[name] = CODECS[inner].from_stored(
                {k: v for k, v in factor.items() if k != "kind"}, sub)
        u_shape, v_shape = parts["u"].shape, parts["v"].shape
        s = tensors["s"]
        if len(u_shape) != 2 or len(v_shape) != 2 or not u_shape[1] == s.numel() == v_shape[0]:
            raise CodecError(f"{kind} codec: factors of shapes {u_shape}, {tuple(s.shape)} and "
                             f"{v_shape} do not multiply")
        expect_tensor(s, kind, "s", torch.float32, (u_shape[1],))
        return cls(parts["u"], s, parts["v"])


@dataclass
class Ternary(Codec):
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

    def meta(self):
        return {"shape": list(self.shape)}

    @classmethod
    def from_stored(cls, meta, tensors):
        kind = cls.kind
        expect_meta(meta, kind, {"shape"})
        shape = stored_shape(meta, kind)
        expect_tensors(tensors, kind, {"codes", "alpha"})
        expect_packed(tensors["codes"], kind, "codes", math.prod(shape), 2)
        expect_tensor(tensors["alpha"], kind, "alpha", torch.float32, ())
        if _max_code(tensors["codes"], math.prod(shape)) > 2:
            raise CodecError(f"{kind} codec: a code is 3, which no ternary value has")
        return cls(tensors["codes"], tensors["alpha"], shape)


@dataclass
class Mask(Codec):
    """A 1-bit mask over a shared tensor: the delta is ``mask * shared`` (EMR, TALL-Mask)."""

    bits: Tensor  # packed
    shape: tuple[int, ...]
    kind: ClassVar[str] = "mask"

    def decode(self, shared=None):
        if shared is None:
            raise ValueError("a mask payload needs its shared tensor to decode")
        mask = unpack_bits(self.bits, 1, math.prod(self.shape)).bool().reshape(self.shape)
        return torch.where(mask, shared, torch.zeros((), dtype=shared.dtype))

    def tensors(self):
        return {"bits": self.bits}

    def meta(self):
        return {"shape": list(self.shape)}

    @classmethod
    def from_stored(cls, meta, tensors):
        kind = cls.kind
        expect_meta(meta, kind, {"shape"})
        shape = stored_shape(meta, kind)
        expect_tensors(tensors, kind, {"bits"})
        expect_packed(tensors["bits"], kind, "bits", math.prod(shape), 1)
        return cls(tensors["bits"], shape)


def _max_code(packed: Tensor, numel: int) -> int:
    """The largest of the first ``numel`` 2-bit codes in ``packed``."""
    return int(unpack_bits(packed, 2, numel).max()) if numel else 0


CODECS: dict[str, type[Codec]] = {c.kind: c for c in (Dense, GroupCode, LowRank, Ternary, Mask)}

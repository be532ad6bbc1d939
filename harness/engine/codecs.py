"""Stored per-task payloads: the codecs that decode one tensor's delta, registered by kind.

Every codec knows the tensors it stores (``tensors()``), a little JSON metadata (``meta()``), how
many bytes it occupies (``nbytes``), the shape of what it decodes (``shape``) and how to decode
itself to a float32 delta; ``from_stored`` rebuilds it from stored tensors and metadata, checking
that they fit. Personalized merge results are made of these, so AMR counts exactly what is
written to disk.

A codec class registers itself under its ``kind`` when it is defined (a method's own codec lives
in the method's file); reading a stored result imports the method that wrote it
(:func:`codec_class`), and a plugin may also register codecs through the ``merge_harness.codecs``
entry-point group. Only the generic codecs live here: :class:`Dense` and :class:`LowRank`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import Tensor

from harness.core.bits import packed_nbytes
from harness.core.registry import METHODS, UnknownNameError, load_target

CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register ``cls`` under its ``kind`` (done for every subclass that sets one); a kind taken
    by another class is an error."""
    known = CODECS.get(cls.kind)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"codec kind {cls.kind!r} is taken by {known.__module__}."
                         f"{known.__qualname__}")
    CODECS[cls.kind] = cls
    return cls


def codec_class(kind: str, method: str | None = None) -> type[Codec]:
    """The codec registered as ``kind``; when it is not yet, the method ``method`` (which wrote
    it) is imported, then the ``merge_harness.codecs`` entry points are read."""
    if kind not in CODECS and method is not None:
        try:
            METHODS.get(method)
        except (UnknownNameError, ImportError):
            pass
    if kind not in CODECS:
        for point in entry_points(group="merge_harness.codecs"):
            if point.name == kind:
                register_codec(load_target(point.value))
    if kind not in CODECS:
        raise CodecError(f"no codec of kind {kind!r} is registered (by the method "
                         f"{method!r} or a plugin)")
    return CODECS[kind]

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


def shape_only(meta: dict, kind: str) -> tuple[int, ...]:
    """The shape of a codec whose metadata is its shape alone."""
    expect_meta(meta, kind, {"shape"})
    return stored_shape(meta, kind)


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

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if isinstance(cls.__dict__.get("kind"), str):
            register_codec(cls)

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


class PackedCodec(Codec):
    """A codec of one tensor whose stored metadata is its decoded ``shape`` alone and whose
    tensors include codes bit-packed per entry (a mask, signs, ternary codes)."""

    shape: tuple[int, ...]

    def meta(self):
        return {"shape": list(self.shape)}

    @classmethod
    def stored_shape(cls, meta: dict, tensors: dict[str, Tensor], names: set[str],
                     packed: str, bits: int) -> tuple[int, ...]:
        """The shape in ``meta``, once ``tensors`` are exactly ``names`` and ``packed`` holds
        ``bits`` bits per entry of that shape; raises :class:`CodecError` otherwise."""
        shape = shape_only(meta, cls.kind)
        expect_tensors(tensors, cls.kind, names)
        expect_packed(tensors[packed], cls.kind, packed, math.prod(shape), bits)
        return shape


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
            if not isinstance(inner, str) or codec_class(inner) is LowRank:
                raise CodecError(f"{kind} codec: factor {name} has kind {inner!r}")
            sub = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
            parts[name] = codec_class(inner).from_stored(
                {k: v for k, v in factor.items() if k != "kind"}, sub)
        u_shape, v_shape = parts["u"].shape, parts["v"].shape
        s = tensors["s"]
        if len(u_shape) != 2 or len(v_shape) != 2 or not u_shape[1] == s.numel() == v_shape[0]:
            raise CodecError(f"{kind} codec: factors of shapes {u_shape}, {tuple(s.shape)} and "
                             f"{v_shape} do not multiply")
        expect_tensor(s, kind, "s", torch.float32, (u_shape[1],))
        return cls(parts["u"], s, parts["v"])


@dataclass
class TaskPayload:
    """One task's stored information: a codec per changed key and an optional task scale."""

    records: dict[str, Codec] = field(default_factory=dict)
    scale: Tensor | None = None      # float32 scalar applied to every decoded delta (EMR)
    shared: str | None = None        # name of the shared state dict that Mask codecs refer to

    def nbytes(self) -> int:
        total = sum(codec.nbytes for codec in self.records.values())
        if self.scale is not None:
            total += self.scale.numel() * self.scale.element_size()
        return total

    def delta(self, key: str, shared) -> Tensor | None:
        """The float32 delta of ``key`` for this task, or None when nothing is stored."""
        codec = self.records.get(key)
        if codec is None:
            return None
        ref = shared[self.shared][key] if self.shared else None
        out = codec.decode(ref)
        if self.scale is not None:
            out = out * self.scale
        return out

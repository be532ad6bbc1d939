"""Streaming merge outputs: model-sized results written shard by shard as they are made.

Inside ``with stream_outputs(directory):`` every model-sized state dict a method builds (a
shared merged model, EMR's tau_uni, TALL's tau_MTL) is a :class:`ShardWriter`: each tensor goes
into an in-memory shard that is written to a safetensors file once it holds ``shard_bytes``, and
is read back memory-mapped from then on. Resident memory therefore stays near one shard plus the
tensors of the key being merged, whatever the model size. Each writer works in a temporary
folder and is renamed into place with its Hugging Face index written last, so an interrupted
merge never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, MutableMapping

import numpy
import torch
from torch import Tensor

INDEX = "model.safetensors.index.json"
_TARGET: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "merge_harness_stream_target", default=None)
_COUNTER = itertools.count()


class ShardWriter(MutableMapping):
    """A state dict that spills to safetensors shards; finished by :meth:`finish`."""

    def __init__(self, directory: str, shard_bytes: int = 2**30) -> None:
        self.directory = directory
        self.shard_bytes = shard_bytes
        parent = os.path.dirname(os.path.abspath(directory)) or "."
        os.makedirs(parent, exist_ok=True)
        self._work = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-",
                                      dir=parent)
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._files: dict[str, str] = {}            # key -> shard file name
        self._sizes: dict[str, int] = {}            # key -> bytes
        self._dtypes: dict[str, torch.dtype] = {}
        self._handles: dict[str, object] = {}       # shard file name -> safe_open handle
        self._order: list[str] = []
        self.finished = False

    def __setitem__(self, key: str, tensor: Tensor) -> None:
        if key in self._files:
            raise KeyError(f"{key!r} was already written to a shard; shards are write-once")
        if key not in self._pending:
            self._order.append(key)
        else:
            self._pending_bytes -= self._sizes[key]
        self._pending[key] = tensor.cpu().contiguous()
        self._sizes[key] = tensor.numel() * tensor.element_size()
        self._dtypes[key] = tensor.dtype
        self._pending_bytes += self._sizes[key]
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending tensors as the next shard."""
        if not self._pending:
            return
        from safetensors import safe_open
        from safetensors.torch import save_file

        name = f"shard-{len(self._handles) + 1:05d}.safetensors"
        save_file(self._pending, os.path.join(self._work, name))
        self._handles[name] = safe_open(os.path.join(self._work, name), "pt")
        for key in self._pending:
            self._files[key] = name
        self._pending, self._pending_bytes = {}, 0

    def __getitem__(self, key: str) -> Tensor:
        if key in self._pending:
            return self._pending[key]
        try:
            name = self._files[key]
        except KeyError:
            raise KeyError(key) from None
        return self._handles[name].get_tensor(key)

    def patch(self, key: str, positions: Tensor, values: Tensor) -> None:
        """Overwrite entries (flat ``positions``) of a key already set: in its pending shard,
        or in place in the shard file written for it."""
        if key in self._pending:
            patch_tensor(self._pending[key], positions, values)
        elif key in self._files:
            patch_safetensors_file(os.path.join(self._work, self._files[key]), key, positions,
                                   values.to(self._dtypes[key]), self._sizes[key])
        else:
            raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        raise TypeError("a ShardWriter is append-only")

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def finish(self):
        """Flush, write the index last, move the folder into place; return it lazily read."""
        from harness.state_dict import LazyStateDict

        self.flush()
        total = sum(self._sizes.values())
        with open(os.path.join(self._work, INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {k: self._files[k] for k in self._order}}, f, indent=1)
        self._handles.clear()
        if os.path.exists(self.directory):
            shutil.rmtree(self.directory)
        os.replace(self._work, self.directory)
        self.finished = True
        return LazyStateDict(os.path.join(self.directory, INDEX))

    def discard(self) -> None:
        self._handles.clear()
        shutil.rmtree(self._work, ignore_errors=True)


@contextlib.contextmanager
def stream_outputs(directory: str | os.PathLike, shard_bytes: int = 2**30):
    """Within the block, model-sized merge outputs are written as shards under ``directory``
    (one sub-folder per output), each renamed into place only when complete."""
    token = _TARGET.set((os.fspath(directory), shard_bytes))
    try:
        yield os.fspath(directory)
    finally:
        _TARGET.reset(token)


class CpuOutput(dict):
    """An in-memory output: tensors computed on a merge device are stored on the CPU."""

    def __setitem__(self, key: str, tensor: Tensor) -> None:
        super().__setitem__(key, tensor.cpu())

    def patch(self, key: str, positions: Tensor, values: Tensor) -> None:
        """Overwrite entries (flat ``positions``) of a key already set."""
        patch_tensor(self[key], positions, values)


def patch_tensor(tensor: Tensor, positions: Tensor, values: Tensor) -> None:
    """``tensor.flatten()[positions] = values`` in place (cast to the tensor's dtype)."""
    tensor.view(-1)[positions] = values.to(tensor.dtype)


_SAME_SIZE_INTEGER = {1: (torch.uint8, "u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"),
                      8: (torch.int64, "<i8")}


def patch_safetensors_file(path: str, key: str, positions: Tensor, values: Tensor,
                           nbytes: int) -> None:
    """Overwrite entries (flat ``positions``) of tensor ``key`` (``nbytes`` long, of
    ``values``' dtype) in a safetensors file, in place: the header says where its bytes lie, and
    the values go through a writable memory map, the bytes ``save_file`` would have stored."""
    with open(path, "rb") as f:
        header_bytes = struct.unpack("<Q", f.read(8))[0]
        begin, end = json.loads(f.read(header_bytes))[key]["data_offsets"]
    if end - begin != nbytes:
        raise ValueError(f"{path}: {key!r} holds {end - begin} bytes, expected {nbytes}")
    as_integer, numpy_dtype = _SAME_SIZE_INTEGER[values.element_size()]
    data = numpy.memmap(path, dtype=numpy_dtype, mode="r+", offset=8 + header_bytes + begin,
                        shape=(nbytes // values.element_size(),))
    data[positions.numpy()] = values.contiguous().view(as_integer).numpy()
    data.flush()
    del data


def new_output(name: str) -> MutableMapping:
    """A fresh container for a model-sized output: a dict on the CPU, or a ShardWriter when
    streaming."""
    target = _TARGET.get()
    if target is None:
        return CpuOutput()
    directory, shard_bytes = target
    return ShardWriter(os.path.join(directory, f"{name}-{next(_COUNTER)}"), shard_bytes)


def finish_output(output: MutableMapping):
    """The finished output: the dict itself, or a writer's shards read back lazily."""
    return output.finish() if isinstance(output, ShardWriter) else output


@contextlib.contextmanager
def building(name: str):
    """``with building("merged") as out:`` gives a new output and discards its partial shards
    if the block fails (an interrupted merge leaves nothing that looks complete)."""
    output = new_output(name)
    try:
        yield output
    except BaseException:
        if isinstance(output, ShardWriter):
            output.discard()
        raise

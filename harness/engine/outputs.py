"""Where model-sized merge outputs go: a dict on the CPU, or shards written as they are made.

Inside ``with stream_outputs(directory):`` every model-sized state dict a method builds (a
shared merged model, EMR's tau_uni, TALL's tau_MTL) is a :class:`~harness.io.shards.ShardWriter`;
elsewhere a :class:`CpuOutput`. Methods ask :func:`building` for a fresh output and
:func:`finish_output` for the finished one, whichever it is.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from torch import Tensor

from harness.io.shards import ShardWriter

@dataclass
class _StreamTarget:
    """Where one ``stream_outputs`` block writes: its folder, shard size, names given out."""

    directory: str
    shard_bytes: int
    names: collections.Counter = field(default_factory=collections.Counter)

    def folder_for(self, name: str) -> str:
        """``<directory>/<name>``, then ``<name>-2``, ``<name>-3``... within this block."""
        self.names[name] += 1
        count = self.names[name]
        return os.path.join(self.directory, name if count == 1 else f"{name}-{count}")


_TARGET: contextvars.ContextVar[_StreamTarget | None] = contextvars.ContextVar(
    "merge_harness_stream_target", default=None)


@contextlib.contextmanager
def stream_outputs(directory: str | os.PathLike, shard_bytes: int = 2**30):
    """Within the block, model-sized merge outputs are written as shards under ``directory``
    (one sub-folder per output: ``merged``, ``tau_uni``..., then ``merged-2`` for a second one),
    each moved into place only when complete. An existing sub-folder is replaced only when it is
    a shard folder the harness wrote; anything else there is an error naming it. Give each run
    its own ``directory`` (the runner uses one per run identity)."""
    token = _TARGET.set(_StreamTarget(os.fspath(directory), shard_bytes))
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


def new_output(name: str) -> MutableMapping:
    """A fresh container for a model-sized output: a dict on the CPU, or a ShardWriter when
    streaming."""
    target = _TARGET.get()
    if target is None:
        return CpuOutput()
    return ShardWriter(target.folder_for(name), target.shard_bytes)


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

"""A state dict written to safetensors shards as its tensors arrive (:class:`ShardWriter`).

Each tensor is written to the current shard by a background thread that overlaps the merge
(with direct I/O where the file system takes it: no page-cache copy), and is read back
memory-mapped once its shard is done. Resident memory therefore stays near the tensors of the
key being merged plus a bounded write queue, whatever the model size. Each writer works in a
folder of its own beside its target and moves it into place with its Hugging Face index written
last, so an interrupted merge never leaves a folder that looks complete; it replaces only a
shard folder the harness wrote (:func:`check_replaceable_shards`).
"""

from __future__ import annotations

import collections
import errno
import json
import mmap
import os
import struct
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy
import torch
from torch import Tensor

from harness.io.files import ReplaceRefusedError, UntrustedFileError, WorkFolder, read_json_file
from harness.io.lazy import LazyStateDict

INDEX = "model.safetensors.index.json"


SHARDS_FORMAT = "merge-harness-shards"      # in the index's metadata: the harness wrote it


def check_replaceable_shards(path: str) -> None:
    """Raise :class:`ReplaceRefusedError` unless ``path`` is a shard folder a ShardWriter
    finished (its index says so) holding nothing its index does not list."""
    if os.path.islink(path) or not os.path.isdir(path):
        raise ReplaceRefusedError(f"{path} exists and is not a folder of merged shards: not "
                                  "replaced")
    try:
        index = read_json_file(os.path.join(path, INDEX), "shard index", 256 << 20)
        files = set(index["weight_map"].values())
        ours = index["metadata"]["format"] == SHARDS_FORMAT
        files |= {str(name) for name in index["metadata"].get("files", [])}  # config, tokenizer
    except (OSError, UntrustedFileError, KeyError, TypeError, AttributeError):
        ours = False
    if not ours:
        raise ReplaceRefusedError(f"{path} exists and is not a folder of shards merge-harness "
                                  "wrote (no index saying so): not replaced")
    extra = sorted(set(os.listdir(path)) - {INDEX, *files})
    if extra:
        raise ReplaceRefusedError(f"{path} holds {', '.join(extra[:3])}, which its index does "
                                  "not list: not replaced")


# safetensors' names of the dtypes a merge output can hold
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


IN_FLIGHT_BYTES = 2**28     # tensor bytes handed to the writer thread and not yet written


class ShardWriter(MutableMapping):
    """A state dict written to safetensors shards as its tensors arrive; finished by
    :meth:`finish`.

    Each tensor's bytes go to the current shard file at once, written by a background thread
    (at most ``IN_FLIGHT_BYTES`` waiting, beyond one tensor), so writing overlaps the merge and
    no shard is ever held in memory whole: safetensors' ``save_file`` needs all of a file's
    tensors at once. The thread writes through a 16 MiB staging buffer with direct I/O, past
    the page cache (:class:`_ShardFile`). The header, known only when a shard is complete, goes
    into room reserved at the start of the file (padded with spaces, as the format allows); a
    shard closes when it holds ``shard_bytes`` or its header room is full. A patch to a key of
    the open shard closes that shard first, so no file is written both ways.
    """

    def __init__(self, directory: str, shard_bytes: int = 2**30, *,
                 hub_names: bool = False) -> None:
        """``hub_names``: name the shards as Hugging Face does
        (``model-00001-of-00003.safetensors``, renamed when the count is known at
        :meth:`finish`), for folders that transformers loads (exports)."""
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.hub_names = hub_names
        self._files: list[str] = []          # files beside the shards (add_file)
        self._folder = WorkFolder(directory, "partial")
        self._work = self._folder.path
        # whole pages, so every write of a shard's data and header can bypass the page cache
        self._header_room = max(min(shard_bytes // 1024, 2**20) // _PAGE, 1) * _PAGE
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._in_flight: collections.deque = collections.deque()     # (future, bytes)
        self._in_flight_bytes = 0
        self._open: _OpenShard | None = None
        self._shards = 0
        self._place: dict[str, _Placed] = {}
        self._handles: dict[str, object] = {}       # finished shard -> safe_open handle
        self._finished_shards: set[str] = set()
        self._unclosed: set[_ShardFile] = set()     # shard files not yet closed
        self.finished = False

    def __setitem__(self, key: str, tensor: Tensor) -> None:
        if key in self._place:
            raise KeyError(f"{key!r} was already written to a shard; shards are write-once")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{key!r}: safetensors cannot store dtype {tensor.dtype}")
        tensor = tensor.detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        entry = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape)}
        entry_bytes = len(json.dumps({key: {**entry, "data_offsets": [2**63, 2**63]}}))
        if self._open is not None and not self._open.has_room(entry_bytes, self._header_room):
            self._close_shard()
        if self._open is None:
            self._shards += 1
            name = f"shard-{self._shards:05d}.safetensors"
            file = _ShardFile(os.path.join(self._work, name), self._header_room)
            self._unclosed.add(file)
            self._open = _OpenShard(name, file)
        shard = self._open
        begin = shard.data_bytes
        shard.header[key] = {**entry, "data_offsets": [begin, begin + nbytes]}
        shard.header_bytes += entry_bytes
        shard.data_bytes += nbytes
        self._place[key] = _Placed(shard.name, self._header_room + begin, nbytes, tensor.dtype,
                                   tuple(tensor.shape))
        if nbytes:
            self._submit(nbytes, shard.file.append, tensor.reshape(-1).view(torch.uint8).numpy())
        if shard.data_bytes >= self.shard_bytes:
            self._close_shard()

    def _submit(self, nbytes: int, job, *args) -> None:
        """Hand ``job`` to the writer thread once the bytes in flight leave room for ``nbytes``
        (a writer's error surfaces here)."""
        while self._in_flight and (self._in_flight[0][0].done()
                                   or self._in_flight_bytes + nbytes > IN_FLIGHT_BYTES):
            self._retire_oldest()
        self._in_flight.append((self._writer.submit(job, *args), nbytes))
        self._in_flight_bytes += nbytes

    def _retire_oldest(self) -> None:
        """Wait for the oldest queued job (raising its error, if any)."""
        done, size = self._in_flight.popleft()
        self._in_flight_bytes -= size
        done.result()

    def _drain(self) -> None:
        """Wait until every byte handed to the writer is in its file."""
        while self._in_flight:
            self._retire_oldest()

    def _close_shard(self) -> None:
        """Queue the open shard's header (into its reserved room) and the closing of its file."""
        shard, self._open = self._open, None
        header = json.dumps({"__metadata__": {"format": "pt"}, **shard.header}).encode()
        room = self._header_room - 8
        self._submit(0, self._finish_file, shard.file, struct.pack("<Q", room) + header.ljust(room),
                     self._header_room + shard.data_bytes)
        self._finished_shards.add(shard.name)

    def _finish_file(self, file: _ShardFile, header: bytes, size: int) -> None:
        """Write a shard's header at its start, set its length, close it (the writer's job)."""
        try:
            file.finish(header, size)
        finally:
            self._unclosed.discard(file)

    def __getitem__(self, key: str) -> Tensor:
        try:
            placed = self._place[key]
        except KeyError:
            raise KeyError(key) from None
        name = placed.file
        in_open_shard = name not in self._finished_shards   # no header yet
        if in_open_shard:                                   # its staged bytes first
            self._submit(0, self._open.file.flush)
        self._drain()
        if in_open_shard:
            if not placed.nbytes:
                return torch.empty(placed.shape, dtype=placed.dtype)
            data = numpy.fromfile(os.path.join(self._work, name), dtype=numpy.uint8,
                                  count=placed.nbytes, offset=placed.offset)
            return torch.from_numpy(data).view(placed.dtype).reshape(placed.shape)
        if name not in self._handles:
            from safetensors import safe_open

            self._handles[name] = safe_open(os.path.join(self._work, name), "pt")
        return self._handles[name].get_tensor(key)

    def patch(self, key: str, positions: Tensor, values: Tensor) -> None:
        """Overwrite entries (flat ``positions``) of a key already written, in place in its
        shard file (through a writable memory map; not flushed: the page cache is shared with
        every later read, and msync would wait for the disk, as nothing else here does)."""
        try:
            placed = self._place[key]
        except KeyError:
            raise KeyError(key) from None
        if placed.file not in self._finished_shards:    # no writes to a file patched in place
            self._close_shard()
        self._drain()
        as_integer, numpy_dtype = _SAME_SIZE_INTEGER[placed.dtype.itemsize]
        data = numpy.memmap(os.path.join(self._work, placed.file), dtype=numpy_dtype, mode="r+",
                            offset=placed.offset, shape=(placed.nbytes // placed.dtype.itemsize,))
        data[positions.numpy()] = values.to(placed.dtype).contiguous().view(as_integer).numpy()
        del data

    def __delitem__(self, key: str) -> None:
        raise TypeError("a ShardWriter is append-only")

    def __iter__(self) -> Iterator[str]:
        return iter(self._place)

    def __len__(self) -> int:
        return len(self._place)

    def add_file(self, name: str, write) -> None:
        """A file beside the shards (a config, a tokenizer's files): ``write(folder)`` writes
        files into the unfinished folder; each new plain file is listed in the index, so a
        later export may replace this folder."""
        before = set(os.listdir(self._work))
        write(self._work)
        for new in sorted(set(os.listdir(self._work)) - before):
            if not os.path.isfile(os.path.join(self._work, new)) or new == INDEX:
                raise ValueError(f"{name}: wrote {new!r}, not a plain file beside the shards")
            self._files.append(new)

    def finish(self):
        """Close the last shard, wait for the writes, write the index last, move the folder
        into place; return it lazily read."""
        if self._open is not None:
            self._close_shard()
        self._drain()
        self._writer.shutdown()
        self._handles.clear()
        files = {placed.file for placed in self._place.values()}
        if self.hub_names:
            renamed = {f"shard-{i:05d}.safetensors":
                       f"model-{i:05d}-of-{self._shards:05d}.safetensors"
                       for i in range(1, self._shards + 1)}
            for old in files:
                os.rename(os.path.join(self._work, old), os.path.join(self._work, renamed[old]))
            self._place = {k: placed._replace(file=renamed[placed.file])
                           for k, placed in self._place.items()}
        total = sum(placed.nbytes for placed in self._place.values())
        metadata = {"total_size": total, "format": SHARDS_FORMAT}
        if self._files:
            metadata["files"] = self._files
        with open(os.path.join(self._work, INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": metadata,
                       "weight_map": {k: placed.file for k, placed in self._place.items()}},
                      f, indent=1)
        self._folder.commit(check_replaceable_shards)
        self.finished = True
        return LazyStateDict(os.path.join(self.directory, INDEX))

    def discard(self) -> None:
        """Drop what was written (a failed merge): queued writes are cancelled."""
        self._writer.shutdown(cancel_futures=True)
        for file in self._unclosed:             # the open shard, or one whose closing was queued
            file.close()
        self._unclosed.clear()
        self._open = None
        self._in_flight.clear()
        self._handles.clear()
        self._folder.discard()


class _Placed(NamedTuple):
    """Where a written tensor lies: its shard file, byte offset and length, dtype and shape."""

    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class _OpenShard:
    """The shard being written: its file, header entries and data size so far."""

    name: str
    file: _ShardFile
    header: dict = field(default_factory=dict)
    header_bytes: int = 64          # the braces and the metadata entry, generously
    data_bytes: int = 0

    def has_room(self, entry_bytes: int, room: int) -> bool:
        return self.header_bytes + entry_bytes <= room - 8


_PAGE = 4096        # the alignment of direct I/O: file offsets, lengths and memory addresses


class _ShardFile:
    """A shard file whose data is appended from ``start`` on, through a page-aligned staging
    buffer written in whole pages with ``O_DIRECT`` where the platform and the file system take
    it (the writer thread's object).

    Buffered writes copy every byte into the page cache, and the kernel's work for that (and
    for writing it back) is CPU time that busy cores cannot hide, so streamed merges write past
    the page cache. A staged partial page is written whole (:meth:`flush`)
    and again once more bytes complete it, and :meth:`finish` cuts the file to its length.
    Where a direct write is refused (``EINVAL``: a file system without direct I/O, or larger
    sectors), the file falls back to buffered writes of the same bytes.
    """

    STAGING = 2**24

    def __init__(self, path: str, start: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        direct = getattr(os, "O_DIRECT", 0)
        try:
            self.fd = os.open(path, flags | direct, 0o644)
        except OSError as error:
            if not direct or error.errno != errno.EINVAL:
                raise
            self.fd, direct = os.open(path, flags, 0o644), 0
        self.path = path
        self.direct = bool(direct)
        self.position = start           # where the staged bytes go: a whole page
        # an anonymous mapping is page-aligned, as direct I/O needs
        self.buffer = numpy.frombuffer(mmap.mmap(-1, self.STAGING), dtype=numpy.uint8)
        self.staged = 0

    def append(self, data: numpy.ndarray) -> None:
        """Append ``data``'s bytes, writing each full staging buffer."""
        done = 0
        while done < data.size:
            count = min(self.STAGING - self.staged, data.size - done)
            self.buffer[self.staged:self.staged + count] = data[done:done + count]
            self.staged += count
            done += count
            if self.staged == self.STAGING:
                self._write(self.position, self.buffer)
                self.position += self.STAGING
                self.staged = 0

    def flush(self) -> None:
        """Put the staged bytes in the file, keeping them staged (the last page is written
        whole: what follows the bytes there is overwritten or cut off later)."""
        if self.staged:
            self._write(self.position, self.buffer[:-(-self.staged // _PAGE) * _PAGE])

    def finish(self, header: bytes, size: int) -> None:
        """Write the staged bytes and ``header`` (whole pages) at the start, set the file's
        length to ``size``, close it."""
        try:
            self.flush()
            self.buffer[:len(header)] = numpy.frombuffer(header, dtype=numpy.uint8)
            self._write(0, self.buffer[:len(header)])
            os.ftruncate(self.fd, size)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _write(self, offset: int, data: numpy.ndarray) -> None:
        try:
            self._write_once(offset, data)
        except OSError as error:        # a full disk: name the file
            if error.filename is None:
                raise OSError(error.errno, error.strerror, self.path) from None
            raise

    def _write_once(self, offset: int, data: numpy.ndarray) -> None:
        try:
            _write_at(self.fd, offset, data)
        except OSError as error:
            if not self.direct or error.errno != errno.EINVAL:
                raise
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETFL,
                        fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False
            _write_at(self.fd, offset, data)


def _write_at(fd: int, offset: int, data: numpy.ndarray) -> None:
    """Write all of ``data``'s bytes at ``offset`` of ``fd`` (the writer thread's job: the only
    one writing to ``fd``, so seeking first is safe where ``pwrite`` is missing, on Windows)."""
    view = memoryview(data).cast("B")
    while view:
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view, offset)
        else:
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, view)
        view, offset = view[written:], offset + written


_SAME_SIZE_INTEGER = {1: (torch.uint8, "u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"),
                      8: (torch.int64, "<i8")}

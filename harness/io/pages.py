"""Page residency of merges over memory-mapped inputs: hand back the pages of each key once it
is merged, ask the disk for the next keys' bytes ahead of time, and know the memory limit.

A merge loop (:func:`iter_keys`, :func:`row_blocks`) is what drives both: outside a loop nothing
is noted, so merely reading a :class:`~harness.io.lazy.LazyStateDict` costs nothing extra. The
two process-wide trackers, :data:`MAPPED_PAGES` and :data:`READ_AHEAD`, exist because the pages
of a mapped file belong to the process, not to one state dict.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator

from torch import Tensor

from harness.core.tensors import row_chunks

def _libc_function(name: str):
    """A function of glibc (``malloc_trim``, ``madvise``), or None elsewhere."""
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


class _MappedPages:
    """Pages of memory-mapped input files that merges have read since the last release.

    A tensor read from a mapped safetensors file keeps its pages in the process's resident set
    until the file is closed, so a merge streaming over 100 GB of inputs would end up holding
    100 GB resident (clean page cache, but counted, and competing with the working set).
    :meth:`release` hands them back with ``madvise(MADV_DONTNEED)``: on a file mapping this
    drops clean pages, which fault back from the file if read again (inputs are read-only: a
    write into a :class:`LazyStateDict` tensor is not kept). Only tensors read inside a merge
    loop (:func:`iter_keys`) are noted, each held until released so its mapping cannot go away
    meanwhile, and only if it lies inside a mapping of its own file (per ``/proc/self/maps``,
    scanned afresh for every loop); where that cannot be told (another platform), nothing is.
    """

    PAGE = 4096
    SMALLEST = 1 << 20                  # tensors below this are not worth a system call

    def __init__(self) -> None:
        self.pending: list[Tensor] = []
        self.mappings: dict[str, list[tuple[int, int]]] = {}
        self.loops = 0                      # merge loops running (iter_keys)
        self._madvise = self._libc_madvise()

    @staticmethod
    def _libc_madvise():
        import ctypes

        madvise = _libc_function("madvise")
        if madvise is not None:
            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return madvise

    def _file_mappings(self, path: str) -> list[tuple[int, int]]:
        real, found = os.path.realpath(path), []
        try:
            with open("/proc/self/maps", encoding="utf-8") as maps:
                for line in maps:
                    if line.rstrip("\n").endswith(real):
                        start, end = line.split(None, 1)[0].split("-")
                        found.append((int(start, 16), int(end, 16)))
        except OSError:
            pass
        return found

    def touched(self, path: str, tensor: Tensor) -> None:
        """Note that ``tensor`` (read from the file ``path``) may be released after this key."""
        size = tensor.numel() * tensor.element_size()
        if self._madvise is None or size < self.SMALLEST or not self.loops:
            return
        address = tensor.data_ptr()
        inside = lambda spans: any(a <= address and address + size <= b for a, b in spans)  # noqa: E731
        if not inside(self.mappings.get(path, ())):
            self.mappings[path] = self._file_mappings(path)
            if not inside(self.mappings[path]):
                return
        self.pending.append(tensor)

    def release(self, forget: bool = True) -> None:
        """Hand back the pages read so far; ``forget=False`` (after a row block) keeps the
        tensors noted, so pages their later blocks touch are handed back too."""
        for tensor in self.pending:
            self._drop(tensor)
        if forget:
            self.pending.clear()

    def mapped(self, *tensors: Tensor) -> list[Tensor]:
        """Those of ``tensors`` that are noted themselves (each lying in a mapping of its file):
        the ones whose blocks :meth:`release_views` may hand back."""
        return [t for t in tensors if any(t is noted for noted in self.pending)]

    def release_views(self, views: list[Tensor]) -> None:
        """Hand back the pages of contiguous views of noted tensors (see :meth:`mapped`) now:
        a finished row block's, from whichever thread finished it, while other blocks of the
        same tensors are still being read (only the pages at a block's edges are shared)."""
        for view in views:
            if view.is_contiguous():
                self._drop(view)

    def _drop(self, tensor: Tensor) -> None:
        address, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        start = address - address % self.PAGE
        end = -(-(address + size) // self.PAGE) * self.PAGE
        self._madvise(start, end - start, 4)           # MADV_DONTNEED


MAPPED_PAGES = _MappedPages()


def tensor_byte_ranges(path: str) -> dict[str, tuple[int, int]]:
    """Each tensor's ``(offset, length)`` in bytes inside the safetensors file ``path``, read
    off its header (8 bytes of header length, then the JSON header; data offsets count from
    the header's end)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    start = 8 + size
    return {key: (start + entry["data_offsets"][0],
                  entry["data_offsets"][1] - entry["data_offsets"][0])
            for key, entry in header.items() if key != "__metadata__"}


_MINCORE = _libc_function("mincore")


def page_cached(descriptor: int, offset: int) -> bool:
    """Whether the page of the open file ``descriptor`` holding byte ``offset`` is in the page
    cache (``mincore`` on a one-page private mapping; False where that cannot be told)."""
    if _MINCORE is None:
        return False
    import ctypes
    import mmap

    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(descriptor, offset - start + 1, offset=start, access=mmap.ACCESS_COPY) as view:
        byte = ctypes.c_char.from_buffer(view, offset - start)
        address = ctypes.addressof(byte)
        state = ctypes.c_ubyte()
        found = _MINCORE(ctypes.c_void_p(address - address % mmap.PAGESIZE), ctypes.c_size_t(1),
                         ctypes.byref(state))
        del byte                        # the mapping closes only once nothing points into it
    return found == 0 and bool(state.value & 1)


def read_from_disk(descriptor: int, samples: int = 8) -> bool:
    """Whether the open file ``descriptor`` is (at least partly) to be read from the disk: some
    of ``samples`` pages spread over it past its first MiB (which opening it reads) is not in
    the page cache. A file of a MiB or less counts as on the disk. A single page misled: the
    one at the end of the next key's bytes, checked once the merge (running ahead of the
    read-ahead thread) or the kernel's read-around of its neighbour had already read it, made
    every input of a 14B layer read from the disk look cached, and none got a hint."""
    size = os.fstat(descriptor).st_size
    start = 2**20
    if size <= start:
        return True
    return not all(page_cached(descriptor, start + (size - start) * (2 * i + 1) // (2 * samples))
                   for i in range(samples))


def memory_cgroup_paths(proc: str = "/proc/self/cgroup") -> tuple[str | None, str | None]:
    """This process's cgroup under the v1 memory controller and its v2 cgroup, as paths from
    their hierarchies' roots (None where it has none)."""
    with open(proc, encoding="ascii") as groups:
        lines = [line.rstrip("\n").split(":", 2) for line in groups]
    v1 = next((path.strip("/") for _, controllers, path in lines
               if "memory" in controllers.split(",")), None)
    v2 = next((path.strip("/") for _, controllers, path in lines if controllers == ""), None)
    return v1, v2


def memory_size(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int:
    """The bytes of memory this process may fill, page cache included: the machine's, or the
    lowest limit of its memory cgroup and the cgroups above it (v1 or v2: a container's, say)
    where that is lower."""
    try:
        sizes = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    except (AttributeError, ValueError, OSError):
        sizes = [2**33]
    try:
        v1, v2 = memory_cgroup_paths(proc)
    except OSError:
        return sizes[0]

    def levels(path: str) -> list[str]:        # the cgroup and every one above it
        parts = path.split("/") if path else []
        return ["/".join(parts[:depth]) for depth in range(len(parts) + 1)]
    candidates = []
    if v1 is not None:
        candidates += [os.path.join(root, "memory", level, "memory.limit_in_bytes")
                       for level in levels(v1)]
    if v2 is not None:
        candidates += [os.path.join(base, level, "memory.max") for level in levels(v2)
                       for base in (root, os.path.join(root, "unified"))]
    for candidate in candidates:
        try:
            with open(candidate, encoding="ascii") as limit:
                value = limit.read().strip()
        except OSError:
            continue
        if value.isdigit():
            sizes.append(int(value))
    return min(sizes)


class _ReadAhead:
    """Asks the kernel to read the next keys' input bytes from the disk while a merge works on
    the current key (``posix_fadvise(POSIX_FADV_WILLNEED)``, from a background thread, so a
    busy disk never stalls the merge).

    Merges of models larger than memory read every input from the disk, and a memory-mapped
    read waits for it; the kernel's own read-ahead follows one tensor, not the next key of the
    next model. The :class:`LazyStateDict` read inside a merge loop (:func:`iter_keys`) are
    noted; before each key (from the second on, once they are known), the keys after it are
    queued until ``AHEAD_BYTES`` of them are (the next key at least). Queued bytes go to the
    page cache, never to this process's memory. The window is 1 GiB, at most an eighth of the
    memory this process may fill (:func:`memory_size`), so queued bytes are not evicted before
    their turn, and wide enough to keep a disk busy across several keys.
    Where ``posix_fadvise`` is missing (not Linux), nothing is queued. ``hinted_bytes`` counts
    the bytes passed to the kernel in this process, so a benchmark can tell that hints went out.
    """

    AHEAD_BYTES = min(2**30, memory_size() // 8)

    def __init__(self) -> None:
        self.sources: list = []             # the LazyStateDicts the loop reads
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}
        self._jobs, self._pid = None, None
        self.hinted_bytes = 0

    def read(self, source) -> None:
        """Note that the running merge loop reads ``source`` (a LazyStateDict)."""
        if MAPPED_PAGES.loops and not any(known is source for known in self.sources):
            self.sources.append(source)

    def window(self, keys: list[str]) -> _ReadAheadWindow:
        """The read-ahead state of one merge loop over ``keys``."""
        return _ReadAheadWindow(self, keys)

    def _byte_ranges(self, key: str) -> Iterator[tuple[str, int, int]]:
        for source in self.sources:
            path = source._files.get(key)
            if path is not None:
                ranges = self._ranges.get(path)
                if ranges is None:
                    ranges = self._ranges[path] = tensor_byte_ranges(path)
                yield (path, *ranges[key])

    def _submit(self, path: str, offset: int, length: int) -> None:
        if self._jobs is None or self._pid != os.getpid():      # a forked child has no thread
            import queue
            import threading

            self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
            threading.Thread(target=self._advise, args=(self._jobs,), daemon=True,
                             name="merge-harness-read-ahead").start()
        self._jobs.put((path, offset, length))

    def _advise(self, jobs) -> None:
        """Pass the queued ranges to the kernel; ``None`` ends a loop. Whether a file is read
        from the disk is decided once per loop (:func:`read_from_disk`): asking the kernel to
        read ahead pages it holds is not free, it looks up every one (so would a residency
        check of every range)."""
        from_disk: dict[str, bool] = {}
        while True:
            job = jobs.get()
            if job is None:
                from_disk.clear()           # files may be rewritten before the next loop
            else:
                self._hint(*job, from_disk)

    def _hint(self, path: str, offset: int, length: int, from_disk: dict[str, bool]) -> None:
        """Ask the kernel for a range of ``path`` if the file is read from the disk (decided on
        its first range of the loop, and noted in ``from_disk``)."""
        if from_disk.get(path) is False or not length:
            return
        try:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                if path not in from_disk:
                    from_disk[path] = read_from_disk(descriptor)
                if from_disk[path]:
                    os.posix_fadvise(descriptor, offset, length, os.POSIX_FADV_WILLNEED)
                    self.hinted_bytes += length
            finally:
                os.close(descriptor)
        except (OSError, ValueError):
            pass                # a hint only: the merge reads the bytes anyway

    def clear(self) -> None:
        """Forget the loop's sources and their files (files may be replaced between merges)."""
        self.sources.clear()
        self._ranges.clear()
        if self._jobs is not None:
            self._jobs.put(None)


class _ReadAheadWindow:
    """The keys of one merge loop queued ahead of it, and their bytes still ahead."""

    def __init__(self, owner: _ReadAhead, keys: list[str]) -> None:
        self.owner, self.keys = owner, keys
        self.queued = 0                     # index after the last key queued
        self.sizes: dict[int, int] = {}     # bytes queued for each key still ahead
        self.ahead = 0

    def before(self, index: int) -> None:
        """Queue the keys after ``keys[index]`` up to the budget (the next key at least)."""
        owner = self.owner
        if not owner.sources or not hasattr(os, "posix_fadvise"):
            return
        self.ahead -= self.sizes.pop(index, 0)          # this key's bytes are no longer ahead
        self.queued = max(self.queued, index + 1)
        while self.queued < len(self.keys) and (self.ahead < owner.AHEAD_BYTES
                                                or self.queued == index + 1):
            size = 0
            for path, offset, length in owner._byte_ranges(self.keys[self.queued]):
                owner._submit(path, offset, length)
                size += length
            self.sizes[self.queued] = size
            self.ahead += size
            self.queued += 1


READ_AHEAD = _ReadAhead()


class _HeapTrim:
    """glibc's ``malloc_trim``, called only once freed heap memory passes :attr:`IDLE_BYTES`.

    Per-key temporaries interleaved with long-lived results fragment glibc's heap: freed
    chunks between live ones stay resident until ``malloc_trim`` hands their pages back. A trim
    after every key keeps resident memory near the live set but makes the next allocations
    fault their pages in again (as costly as a merge's arithmetic on small keys), so the freed
    total (``mallinfo2``'s ``fordblks``, all arenas) is looked at first, which walks the free
    lists, and at most every :attr:`INTERVAL_S` seconds (a walk costs as much as merging a small
    key). Where ``mallinfo2`` is missing (glibc < 2.33) every call trims.
    """

    IDLE_BYTES = 64 << 20
    INTERVAL_S = 0.01

    def __init__(self) -> None:
        import ctypes

        self._trim = _libc_function("malloc_trim")
        self._info = _libc_function("mallinfo2")
        if self._info is not None:
            class MallInfo2(ctypes.Structure):
                _fields_ = [(name, ctypes.c_size_t) for name in (
                    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                    "uordblks", "fordblks", "keepcost")]

            self._info.restype = MallInfo2
        self._looked = -math.inf

    def idle_bytes(self) -> int | None:
        """Bytes of freed heap chunks glibc holds, or None where that cannot be told."""
        return None if self._info is None else int(self._info().fordblks)

    def __call__(self, pad: int = 0) -> None:
        """Trim when the freed heap memory is worth it (always, where it cannot be told)."""
        if self._trim is None:
            return
        now = time.monotonic()
        if self._info is not None and now - self._looked < self.INTERVAL_S:
            return
        self._looked = now
        idle = self.idle_bytes()
        if idle is None or idle > self.IDLE_BYTES:
            self._trim(pad)


_MALLOC_TRIM = _HeapTrim()


def iter_keys(keys: list[str], desc: str, progress: bool) -> Iterator[str]:
    """Iterate over keys, with a tqdm bar when ``progress`` is set.

    After each key, the pages of memory-mapped inputs read for it and freed heap memory are
    handed back to the OS (glibc): per-key temporaries interleaved with long-lived results
    otherwise fragment the heap until resident memory grows well past the inputs. Before each
    key, the disk is asked for the next keys' input bytes
    (:class:`_ReadAhead`).
    """
    keys = list(keys)
    shown = keys
    if progress:
        from harness.core.progress import progress as bar

        shown = bar(keys, desc, unit="tensor", leave=False)
    MAPPED_PAGES.loops += 1
    read_ahead = READ_AHEAD.window(keys)
    try:
        for index, key in enumerate(shown):
            read_ahead.before(index)
            yield key
            MAPPED_PAGES.release()
            _MALLOC_TRIM(0)
    finally:
        MAPPED_PAGES.loops -= 1
        MAPPED_PAGES.release()
        if not MAPPED_PAGES.loops:
            MAPPED_PAGES.mappings.clear()     # files may be closed and their addresses reused
            READ_AHEAD.clear()


def row_blocks(shape: tuple[int, ...], tasks: int) -> Iterator:
    """:func:`row_chunks`, handing back the memory-mapped input pages read for each block
    after it, so a tensor larger than memory never becomes resident whole."""
    for rows in row_chunks(shape, tasks):
        yield rows
        MAPPED_PAGES.release(forget=False)

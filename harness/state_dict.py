"""State-dict algebra shared by every method: validation, task vectors, lazy checkpoints.

A state dict is any ``Mapping[str, Tensor]``; it may be lazy (a memory-mapped safetensors file),
so everything here works key by key and never assumes a ``dict``.

Inside ``with merge_device("cuda"):`` task vectors (and so every method's arithmetic, SVDs
included) are computed on that device one key at a time, while the inputs stay where they are
(memory-mapped on the CPU) and every output is stored back on the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from harness.payload import BitPacker

StateDict = Mapping[str, Tensor]


class MergeInputError(ValueError):
    """Models that cannot be merged: the message names the key, the model and the problem."""


def is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def to_float32(t: Tensor) -> Tensor:
    """A float32 view or copy of ``t``; never the caller's tensor when a cast is needed."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


_DEVICE: contextvars.ContextVar[torch.device] = contextvars.ContextVar(
    "merge_harness_device", default=torch.device("cpu"))


@contextlib.contextmanager
def merge_device(device: str | torch.device):
    """Within the block, merges compute on ``device`` (tensors streamed in key by key, results
    stored on the CPU)."""
    token = _DEVICE.set(torch.device(device))
    try:
        yield _DEVICE.get()
    finally:
        _DEVICE.reset(token)


def on_merge_device(t: Tensor) -> Tensor:
    """``t`` on the current merge device (itself when it is already there)."""
    return t.to(_DEVICE.get())


def task_vector(pretrained: Tensor, finetuned: Tensor, out: Tensor | None = None) -> Tensor:
    """``finetuned - pretrained`` in float32 on the merge device (a new tensor, or written into
    the float32 ``out``; inputs are untouched; each input crosses to the device in its own
    dtype and is cast to float32 before the subtraction, whatever that dtype)."""
    finetuned, pretrained = on_merge_device(finetuned), to_float32(on_merge_device(pretrained))
    if out is None:
        return to_float32(finetuned) - pretrained
    if finetuned.dtype == torch.float32:
        return torch.sub(finetuned, pretrained, out=out)
    # another dtype: cast, then subtract (a mixed-dtype subtraction runs 2-4 times slower)
    return out.copy_(finetuned).sub_(pretrained)


@dataclass
class ModelSpec:
    """What a validation pass learns about a set of models to merge."""

    tasks: list[str]
    float_keys: list[str]                       # merged keys, in pretrained order
    other_keys: list[str]                       # non-float buffers, copied from pretrained
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    changed: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> key -> #nonzero
    values_checked: bool = True     # False until a pass over the inputs has run ValueChecks

    @property
    def zero_keys(self) -> set[str]:
        """Keys whose task vector is identically zero in every task."""
        if not self.values_checked:
            raise RuntimeError("the models' values are not checked yet: the non-zero counts "
                               "are known once the merge pass that checks them has run")
        return {k for k in self.float_keys if all(self.changed[t][k] == 0 for t in self.tasks)}

    @property
    def active_keys(self) -> list[str]:
        """Merged keys that some task changed: the AMR parameter set."""
        zero = self.zero_keys
        return [k for k in self.float_keys if k not in zero]

    @property
    def merged_params(self) -> int:
        """Number of parameters in the AMR denominator (spec, Accounting)."""
        return sum(numel(self.shapes[k]) for k in self.active_keys)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_finite(t: Tensor, key: str, model: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise MergeInputError(f"key {key!r} of {model} contains {bad} values")


def count_nonzero(t: Tensor, scratch: Tensor) -> int:
    """The exact number of non-zero entries of a float32 tensor, counted on its bit patterns
    shifted left by one into the int32 ``scratch`` (so -0.0 counts as zero). Counting the floats
    themselves took about a quarter of the validation pass on the CPU."""
    shifted = torch.bitwise_left_shift(t.view(torch.int32), 1, out=scratch)
    return int(torch.count_nonzero(shifted))


def _surely_finite(t: Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf, by one cheap reduction: any NaN or Inf makes the sum
    non-finite. A False (possibly a finite overflow) calls for the exact check."""
    return bool(torch.isfinite(t.sum()))


class BlockBuffers:
    """Named scratch tensors for row blocks, reused from block to block (and key to key): a
    fresh large allocation is fresh pages for the kernel to fault in and zero, which cost as
    much as the arithmetic on them. A view is valid until the same name is asked for again."""

    def __init__(self) -> None:
        self._flat: dict[str, Tensor] = {}

    def view(self, name: str, like: Tensor, dtype: torch.dtype = torch.float32,
             count: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """Buffer ``name`` shaped like ``like`` (``(count, *like.shape)`` with ``count``), on its
        device or ``device``; grown when a larger block asks."""
        shape = tuple(like.shape) if count is None else (count, *like.shape)
        device = like.device if device is None else torch.device(device)
        n = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n or flat.device != device:
            flat = self._flat[name] = torch.empty(n, dtype=dtype, device=device)
        return flat[:n].view(shape)

    def float32(self, name: str, t: Tensor) -> Tensor:
        """``t`` in float32 on the merge device: ``t`` itself when it already is, else a copy
        in buffer ``name``."""
        t = on_merge_device(t)
        return t if t.dtype == torch.float32 else self.view(name, t).copy_(t)


class ValueChecks:
    """Validation's checks on values, run on the float32 blocks of a pass over the inputs:
    NaN/Inf in any model, each task's number of non-zero task-vector entries per key, and no
    task whose task vector is zero everywhere. :func:`inspect_models` runs them in a pass of its
    own; an elementwise merge runs them on the blocks it computes anyway
    (``inspect_models(values=False)``), which spares a whole read of the inputs."""

    def __init__(self, spec: ModelSpec, allow_zero_tasks: bool = False) -> None:
        self.spec, self.allow_zero_tasks = spec, allow_zero_tasks
        self.buffers = BlockBuffers()

    def pretrained(self, key: str, theta0: Tensor) -> None:
        """Check a float32 block of the pretrained model."""
        if not _surely_finite(theta0):
            _check_finite(theta0, key, "the pretrained model")

    def task(self, task: str, key: str, delta: Tensor, source: Tensor,
             counted: tuple[int, bool] | None = None, overflow_ok: bool = False) -> None:
        """Check a task's float32 task-vector block ``delta`` (of the block ``source`` of its
        model) and count its non-zero entries; ``counted`` gives the counts of non-zero and of
        non-finite entries when the caller has them already. A delta that overflows float32
        where both models are finite is an error, unless ``overflow_ok`` (a rule that merges
        the weights themselves, never their difference)."""
        if counted is None:
            nonzero = count_nonzero(delta, self.buffers.view("bits", delta, torch.int32))
            nonfinite = not _surely_finite(delta)
        else:
            nonzero, nonfinite = counted
        if nonfinite and (counted is not None or not bool(torch.isfinite(delta).all())):
            _check_finite(source, key, f"task model {task!r}")
            if not overflow_ok:
                raise MergeInputError(
                    f"the task vector of key {key!r} for task model {task!r} overflows float32: "
                    "both models are finite there, their difference is not")
        self.spec.changed[task][key] += nonzero

    def unchanged(self, key: str) -> bool:
        """Whether every task's task vector of ``key`` (all of whose blocks are checked) is
        zero: a key outside the AMR parameter set, which masking merges do not store."""
        return all(self.spec.changed[task][key] == 0 for task in self.spec.tasks)

    def finish(self) -> None:
        """After every block: refuse a task that equals the pretrained model, and mark the
        values checked."""
        spec = self.spec
        if not self.allow_zero_tasks:
            for task in spec.tasks:
                if not any(spec.changed[task].values()):
                    raise MergeInputError(
                        f"task model {task!r} equals the pretrained model on every merged key "
                        "(its task vector is zero): was the pretrained model passed by mistake?")
        spec.values_checked = True


def inspect_models(pretrained: StateDict, finetuned: Mapping[str, StateDict],
                   *, allow_zero_tasks: bool = False, observe=None,
                   values: bool = True) -> ModelSpec:
    """Validate models before any merging work and describe them (one pass over every tensor;
    none with ``values=False``).

    ``observe(task, key, delta)``, when given, sees each float32 task vector as it is computed
    (in row blocks of large keys, so memory stays bounded), so a method can gather whole-model
    statistics without another pass over the inputs. ``delta`` is scratch, reused for the next
    block: valid during the call only, and the hook may overwrite it. A hook that sees every
    value anyway (a histogram) may return ``delta``'s numbers of non-zero and of non-finite
    entries, which validation then does not count again.

    With ``values=False`` only keys, shapes and dtypes are checked (no tensor is read) and the
    value checks are left to the merge pass (:class:`ValueChecks`, run by :func:`merge_shared`).

    Raises :class:`MergeInputError` on an empty task set, a missing or extra key, a shape
    mismatch, a non-float tensor where a float is required, NaN/Inf values, or a task whose task
    vector is identically zero (almost always the pretrained model passed by mistake).
    """
    tasks = list(finetuned)
    if not tasks:
        raise MergeInputError("no task models given: the task set is empty")
    pre_keys = list(pretrained.keys())
    pre_set = set(pre_keys)
    for task in tasks:
        keys = set(finetuned[task].keys())
        missing = [k for k in pre_keys if k not in keys]
        if missing:
            raise MergeInputError(
                f"key {missing[0]!r} is missing from task model {task!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(keys - pre_set)
        if extra:
            raise MergeInputError(
                f"key {extra[0]!r} of task model {task!r} is missing from the pretrained model"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    spec = ModelSpec(tasks, [], [], {}, {}, {t: {} for t in tasks}, values_checked=False)
    checks = ValueChecks(spec, allow_zero_tasks) if values else None
    buffers = BlockBuffers()
    for key in iter_keys(pre_keys, "validate", False) if values else pre_keys:
        p = pretrained[key]
        spec.shapes[key] = tuple(p.shape)
        spec.dtypes[key] = p.dtype
        if not is_float(p):
            spec.other_keys.append(key)
            continue
        spec.float_keys.append(key)
        sources = [finetuned[task][key] for task in tasks]
        for task, t in zip(tasks, sources):
            if not is_float(t):
                raise MergeInputError(
                    f"key {key!r} of task model {task!r} has dtype {t.dtype}, "
                    f"where a floating-point tensor is required")
            if tuple(t.shape) != spec.shapes[key]:
                raise MergeInputError(
                    f"key {key!r} has shape {tuple(t.shape)} in task model {task!r} but "
                    f"{spec.shapes[key]} in the pretrained model")
            spec.changed[task][key] = 0
        if checks is None:
            continue
        for rows in row_blocks(spec.shapes[key], 2):    # a block of theta_0 and of one delta
            p32 = buffers.float32("theta0", p[rows])
            checks.pretrained(key, p32)
            delta = buffers.view("delta", p32)
            for task, t in zip(tasks, sources):
                block = t[rows]
                task_vector(p32, block, out=delta)   # NaN/Inf in t shows too
                counted = observe(task, key, delta) if observe is not None else None
                checks.task(task, key, delta, block, counted)
    if checks is not None:
        checks.finish()
    return spec


def cast_like(value: Tensor, dtype: torch.dtype) -> Tensor:
    return value if value.dtype == dtype else value.to(dtype)


def store_rows(value: Tensor, rows, block: Tensor) -> None:
    """Write the merge-device ``block`` into ``value[rows]`` (an output on the CPU), cast to
    ``value``'s dtype. From another device the block is cast there (a crossing that casts would
    cross in float32 and cast on the CPU) and lands in a temporary that the CPU's threads copy
    into the output: crossing straight into it leaves one thread to fault in all its fresh pages
    (that way TIES on a 14B layer took 2.5 s on an H200, against 2.2 s with torch's crossing;
    this way is not measured on a GPU yet)."""
    if block.device == value.device:
        value[rows].copy_(block)
    else:
        value[rows].copy_(cast_like(block, value.dtype).cpu())


def _open_checked(path: str):
    """A safetensors handle, or an error naming the file (missing, truncated, not safetensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as error:
        raise MergeInputError(f"cannot read the safetensors file {path}: {error}") from None


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
            address, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
            start = address - address % self.PAGE
            end = -(-(address + size) // self.PAGE) * self.PAGE
            self._madvise(start, end - start, 4)           # MADV_DONTNEED
        if forget:
            self.pending.clear()


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
    their turn; 64 MiB gained less (the README's performance section has the measurements).
    Where ``posix_fadvise`` is missing (not Linux), nothing is queued. ``hinted_bytes`` counts
    the bytes passed to the kernel in this process, so a benchmark can tell that hints went out.
    """

    AHEAD_BYTES = min(2**30, memory_size() // 8)

    def __init__(self) -> None:
        self.sources: list[LazyStateDict] = []
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}
        self._jobs, self._pid = None, None
        self.hinted_bytes = 0

    def read(self, source: LazyStateDict) -> None:
        """Note that the running merge loop reads ``source``."""
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
        read ahead pages it holds is not free, it looks up every one (plain hints made warm
        merges of 8 ViT-B/32 models about 0.2 s slower, as did a residency check of every
        range)."""
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


class LazyStateDict(Mapping[str, Tensor]):
    """A read-only state dict over safetensors files, loading one tensor at a time.

    ``path`` is a ``.safetensors`` file, a Hugging Face sharded index
    (``*.safetensors.index.json``), or a folder holding either. Tensors are views of the
    memory-mapped files; merge loops hand their pages back after each key
    (:class:`_MappedPages`), so resident memory does not grow with the inputs' size.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = _find_checkpoint(path)
        self.path = path
        if path.endswith(".json"):
            weight_map = read_weight_map(path)
            folder = os.path.dirname(path)
            files = sorted(set(weight_map.values()))
            handles = {f: _open_checked(os.path.join(folder, f)) for f in files}
            for key, file in weight_map.items():
                if key not in handles[file].keys():
                    raise MergeInputError(
                        f"shard {os.path.join(folder, file)} does not hold {key!r}, which "
                        f"its index {path} places there: the shard and the index disagree")
            self._where = {k: handles[f] for k, f in weight_map.items()}
            self._files = {k: os.path.join(folder, f) for k, f in weight_map.items()}
        else:
            handle = _open_checked(path)
            self._where = {k: handle for k in handle.keys()}
            self._files = dict.fromkeys(self._where, path)

    def __getitem__(self, key: str) -> Tensor:
        try:
            handle = self._where[key]
        except KeyError:
            raise KeyError(key) from None
        tensor = handle.get_tensor(key)
        MAPPED_PAGES.touched(self._files[key], tensor)
        READ_AHEAD.read(self)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return f"LazyStateDict({self.path!r}, {len(self)} tensors)"


def read_weight_map(path: str) -> dict[str, str]:
    """The ``weight_map`` of a Hugging Face shard index, checked: JSON, an object of tensor
    names to shard files that lie in the index's own folder; else an error naming the file."""
    from harness.files import UntrustedFileError, read_json_file

    try:
        index = read_json_file(path, "shard index", 256 << 20)
    except FileNotFoundError:
        raise MergeInputError(f"the shard index {path} does not exist") from None
    except (OSError, UntrustedFileError) as error:
        raise MergeInputError(f"cannot read the shard index: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MergeInputError(f"the shard index {path} has no weight_map of tensor names to "
                              "shard files")
    for key, file in weight_map.items():
        if (not isinstance(file, str) or not file or os.path.basename(file) != file
                or file in (".", "..")):
            raise MergeInputError(f"the shard index {path} places {key!r} in {file!r}, not a "
                                  "file of the index's folder")
    return weight_map


def _find_checkpoint(folder: str) -> str:
    for name in ("model.safetensors.index.json", "model.safetensors"):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(found) == 1:
        return os.path.join(folder, found[0])
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {folder!r}")


_MALLOC_TRIM = _libc_function("malloc_trim")


def iter_keys(keys: list[str], desc: str, progress: bool) -> Iterator[str]:
    """Iterate over keys, with a tqdm bar when ``progress`` is set.

    After each key, the pages of memory-mapped inputs read for it and freed heap memory are
    handed back to the OS (glibc): per-key temporaries interleaved with long-lived results
    otherwise fragment the heap, and resident memory grew by up to 2 GiB over the inputs on 8
    ViT-B/32 models. Before each key, the disk is asked for the next keys' input bytes
    (:class:`_ReadAhead`).
    """
    keys = list(keys)
    shown = keys
    if progress:
        from tqdm.auto import tqdm

        shown = tqdm(keys, desc=desc, unit="tensor", leave=False)
    MAPPED_PAGES.loops += 1
    read_ahead = READ_AHEAD.window(keys)
    try:
        for index, key in enumerate(shown):
            read_ahead.before(index)
            yield key
            MAPPED_PAGES.release()
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)
    finally:
        MAPPED_PAGES.loops -= 1
        MAPPED_PAGES.release()
        if not MAPPED_PAGES.loops:
            MAPPED_PAGES.mappings.clear()     # files may be closed and their addresses reused
            READ_AHEAD.clear()


CHUNK_BYTES = 2**23     # float32 bytes of one row block of all tasks' task vectors on the CPU
DEVICE_CHUNK_BYTES = 2**25      # the same on another merge device (a GPU)


def row_chunks(shape: tuple[int, ...], tasks: int) -> list:
    """Row blocks of a tensor such that all tasks' float32 vectors of one block stay near
    ``CHUNK_BYTES``, for merge rules that are elementwise across tasks (blocks then give the
    same bits as whole keys); a 0-d tensor is one block.

    On the CPU, 8 MiB blocks keep a block's temporaries (its task vectors, theta_0, scratch) in
    the last-level cache from one operation to the next: against 32 MiB blocks, Task Arithmetic,
    TIES, EMR and Weight Averaging ran 20-35% faster on a cached 14B layer in throwaway runs (2
    cores, 32 MiB L3; DARE and TALL-Mask about the same). Blocks of 4 MiB were as fast from the
    page cache but less steady from the disk, and blocks of 1 MiB lost it all to per-operation
    overhead. A GPU keeps 32 MiB blocks: fewer transfers and kernel launches (not measured at
    other sizes).
    """
    if not shape:
        return [...]
    row = max(1, math.prod(shape[1:]))
    budget = CHUNK_BYTES if _DEVICE.get().type == "cpu" else DEVICE_CHUNK_BYTES
    step = max(1, budget // (4 * tasks * row))
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def row_blocks(shape: tuple[int, ...], tasks: int) -> Iterator:
    """:func:`row_chunks`, handing back the memory-mapped input pages read for each block
    after it, so a tensor larger than memory never becomes resident whole."""
    for rows in row_chunks(shape, tasks):
        yield rows
        MAPPED_PAGES.release(forget=False)


def task_vector_blocks(pretrained: StateDict, finetuned: Mapping[str, StateDict],
                       spec: ModelSpec, key: str, *, weights: bool = False,
                       checks: ValueChecks | None = None, whole: bool = False) -> Iterator[tuple]:
    """``(rows, theta_0 block, the tasks' task-vector blocks)`` of one key in row blocks, float32
    on the merge device, for rules that are elementwise across tasks (``whole``: the key as one
    block, ``rows`` then ``...``); with ``weights``, the tasks' own weights (float32, possibly
    views of the inputs) instead of their task vectors. With ``checks``, every block is checked
    (:class:`ValueChecks`) before it is handed over.

    Task vectors (and weight casts) are computed into :class:`BlockBuffers`, reused for the next
    block: use each block's before asking for the next.
    """
    p, sources = pretrained[key], [finetuned[t][key] for t in spec.tasks]
    buffers = BlockBuffers()
    for rows in [...] if whole else row_blocks(spec.shapes[key], len(sources)):
        theta0 = buffers.float32("theta0", p[rows])
        if checks is not None:
            checks.pretrained(key, theta0)
        blocks = [source[rows] for source in sources]
        if weights:
            inputs = [buffers.float32(f"weights{row}", block) for row, block in enumerate(blocks)]
            if checks is not None:
                delta = buffers.view("delta", theta0)
                for task, weight, block in zip(spec.tasks, inputs, blocks):
                    checks.task(task, key, torch.sub(weight, theta0, out=delta), block,
                                overflow_ok=True)
            yield rows, theta0, inputs
            continue
        taus = list(buffers.view("taus", theta0, count=len(sources)))
        for task, tau, block in zip(spec.tasks, taus, blocks):
            task_vector(theta0, block, out=tau)
            if checks is not None:
                checks.task(task, key, tau, block)
        yield rows, theta0, taus


def shared_and_masks(pretrained: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
                     key: str, rule, checks: ValueChecks | None = None
                     ) -> tuple[Tensor, list[Tensor]]:
    """One key of a masking rule, ``rule(taus) -> (shared block, the tasks' bool masks)``, that
    is elementwise across tasks (EMR, TALL-Mask), run in row blocks: the float32 shared tensor
    on the CPU and each task's mask packed at 1 bit per entry, the bits of the whole key. With
    ``checks``, the key's values are checked on the same blocks."""
    shape = spec.shapes[key]
    shared = torch.empty(shape, dtype=torch.float32, device="cpu")
    packers = [BitPacker(numel(shape), 1) for _ in spec.tasks]
    for rows, _, taus in task_vector_blocks(pretrained, finetuned, spec, key, checks=checks):
        block, masks = rule(taus)
        store_rows(shared, rows, block)
        for packer, mask in zip(packers, masks):
            packer.add(mask.cpu())
    return shared, [packer.finish() for packer in packers]


def merge_shared(pretrained: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
                 merge_key, desc: str, progress: bool, *, elementwise: bool = False,
                 weights: bool = False) -> StateDict:
    """A merged state dict built key by key: ``merge_key(key, theta0_f32, taus)`` gives the
    float32 merged tensor of each float key; other keys are copied from the pretrained model.
    With ``elementwise`` (the rule treats every entry on its own) large keys go through in row
    blocks, so memory stays bounded by a block rather than a whole key (the same bits); with
    ``weights``, ``merge_key`` gets the tasks' float32 weights in place of ``taus``. A ``spec``
    whose values are not checked yet (``inspect_models(values=False)``) gets them checked on the
    blocks (or whole keys) of this pass.
    """
    from harness.sharded import building, finish_output

    float_keys = set(spec.float_keys)
    checks = None if spec.values_checked else ValueChecks(spec)
    with building("merged") as merged:
        for key in iter_keys(list(pretrained.keys()), desc, progress):
            p = pretrained[key]
            if key not in float_keys:
                merged[key] = p
                continue
            value = torch.empty(spec.shapes[key], dtype=p.dtype, device="cpu")
            for rows, theta0, inputs in task_vector_blocks(pretrained, finetuned, spec, key,
                                                           weights=weights, checks=checks,
                                                           whole=not elementwise):
                store_rows(value, rows, merge_key(key, theta0, inputs))
            merged[key] = value
        if checks is not None:
            checks.finish()
        return finish_output(merged)


@dataclass(frozen=True)
class BlockedDelta:
    """The float32 delta ``source - reference`` of a tensor too large to hold whole: each call
    of :meth:`blocks` reads it again, block by block along its longer side."""

    reference: Tensor
    source: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.reference.shape)

    def blocks(self) -> Iterator[tuple[object, Tensor]]:
        """``(index, block)``: float32 blocks on the merge device; ``index`` places a block in
        the whole tensor (rows, or for a wide matrix ``(slice(None), columns)``)."""
        shape = self.shape
        wide = len(shape) == 2 and shape[0] < shape[1]
        for part in row_blocks(shape[::-1] if wide else shape, 2):
            index = (slice(None), part) if wide else part
            yield index, task_vector(self.reference[index], self.source[index])


def encode_deltas(reference: StateDict, finetuned: Mapping[str, StateDict], spec: ModelSpec,
                  encode, desc: str, progress: bool, *, blocked=None) -> dict[str, dict]:
    """Per task, ``encode(key, delta)`` of each non-zero float32 delta against ``reference``.

    Keys no task changed are skipped (they are outside the AMR parameter set); ``encode`` may
    return None to store nothing for a key. Keys for which ``blocked(key)`` holds reach
    ``encode`` as a :class:`BlockedDelta`, never whole, and may be zero. Returns task -> key ->
    codec.
    """
    records: dict[str, dict] = {t: {} for t in spec.tasks}
    for key in iter_keys(spec.active_keys, desc, progress):
        ref = reference[key]
        for task in spec.tasks:
            try:
                if blocked is not None and blocked(key):
                    delta = BlockedDelta(ref, finetuned[task][key])
                    codec = encode(key, delta)
                else:
                    delta = task_vector(ref, finetuned[task][key])
                    if not _surely_finite(delta) and not bool(torch.isfinite(delta).all()):
                        raise MergeInputError(
                            f"the delta of key {key!r} of task model {task!r} against the "
                            "method's base is not finite: the base (or the task vector) overflows "
                            "float32")
                    codec = encode(key, delta) if delta.any() else None
            except torch.linalg.LinAlgError as error:
                raise MergeInputError(f"the decomposition of key {key!r} of task model {task!r} "
                                      f"failed: {error}") from None
            if codec is not None:
                records[task][key] = codec.cpu()
            del delta, codec                 # not alive while the next task's delta is built
            MAPPED_PAGES.release(forget=False)    # nor this task's mapped input pages
    return records

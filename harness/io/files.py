"""File primitives for everything the harness writes or reads back: checksums, atomic writes,
bounded reads of untrusted files, and folders moved into place whole.

Two promises hold for every caller:

- **Atomic.** A file or folder appears at its path complete or not at all: it is written beside
  its target under a temporary name, flushed to disk, then renamed over it. A folder replaces an
  older one by an atomic exchange where the OS offers one (Linux ``renameat2``), so no reader
  ever finds neither.
- **Nothing it did not create is deleted.** A work folder is owned through a lock file beside it
  (``<folder>.lock``, held with ``flock`` while its process lives); leftovers of killed runs are
  removed on a later write only when their lock file is free, and a folder is replaced only after
  its caller has checked that the harness wrote it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str) -> None:
    """Flush a file's or a folder's entries to disk (a no-op where the OS refuses)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, rename it over
    ``path``. On any error (a full disk included) ``path`` keeps its old contents."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1],
                                       dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError) and error.filename is None:     # ENOSPC from a write
            raise OSError(error.errno, error.strerror or str(error), path) from None
        raise
    _fsync(folder)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, data: dict) -> None:
    """JSON (sorted keys, one-space indent, a final newline), written atomically."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


class UntrustedFileError(ValueError):
    """A file that cannot be read as asked: not a regular file, too large, or not UTF-8."""


def read_regular_file(path: str, what: str, max_bytes: int) -> bytes:
    """The bytes of ``path``, refusing what is not a regular file (a FIFO, ``/dev/zero``, a
    folder) or is larger than ``max_bytes``, with an error naming it. ``FileNotFoundError``
    passes through."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise UntrustedFileError(f"{what} {path} cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedFileError(f"{what} {path} is not a regular file")
    if info.st_size > max_bytes:
        raise UntrustedFileError(f"{what} {path} is {info.st_size} bytes, over the "
                                 f"{max_bytes}-byte limit of such files")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UntrustedFileError(f"{what} {path} grew over {max_bytes} bytes while read")
    return data


def read_text_file(path: str, what: str, max_bytes: int) -> str:
    """:func:`read_regular_file` decoded as UTF-8, or an error naming the file."""
    data = read_regular_file(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UntrustedFileError(f"{what} {path} is not UTF-8 text (byte {error.start})") \
            from None


def read_json_file(path: str, what: str, max_bytes: int = 64 << 20):
    """The JSON value in ``path``, or :class:`UntrustedFileError` naming the file and the
    problem (not JSON, an integer of thousands of digits, nesting too deep, ...)."""
    text = read_text_file(path, what, max_bytes)
    try:
        return json.loads(text)
    except RecursionError:
        raise UntrustedFileError(f"{what} {path} nests too deeply") from None
    except ValueError as error:          # JSONDecodeError, and integers over the digit limit
        raise UntrustedFileError(f"{what} {path} is not valid JSON: {error}") from None


# ---- folders moved into place ---------------------------------------------------------------
class ReplaceRefusedError(FileExistsError):
    """A write that would replace something the harness did not write; the message names it."""


_RENAME_EXCHANGE = 2


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    return function


_RENAMEAT2 = _renameat2()
_AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (both must exist); False where the OS or the
    file system offers no atomic exchange."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


class WorkFolder:
    """A temporary folder beside ``target`` that becomes ``target`` when complete.

    The folder is ``.<target name>.<kind>-<random>`` in the target's parent; this process holds
    an ``flock`` on ``<folder>.lock`` until :meth:`commit` or :meth:`discard`, so a later
    :func:`clean_leftovers` removes the folder only once its owner is gone. Creating one first
    removes the leftovers of killed runs of the same kind in that parent.
    """

    def __init__(self, target: str, kind: str) -> None:
        self.target = os.path.abspath(target)
        self.parent = os.path.dirname(self.target)
        self.kind = kind
        os.makedirs(self.parent, exist_ok=True)
        clean_leftovers(self.parent, kind)
        name = os.path.basename(self.target)
        self.path = os.path.join(self.parent, f".{name}.{kind}-{secrets.token_hex(6)}")
        self._lock_path = self.path + ".lock"
        self._lock = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        os.mkdir(self.path)
        self.done = False

    def commit(self, may_replace: Callable[[str], None]) -> None:
        """Move the folder to the target. An existing target is first passed to
        ``may_replace(path)``, which raises unless the harness wrote what is there; it is then
        swapped out atomically (or, where no exchange exists, renamed aside just before) and
        removed."""
        for name in os.listdir(self.path):
            _fsync_file(os.path.join(self.path, name))
        _fsync(self.path)
        try:
            while True:
                if os.path.lexists(self.target):
                    may_replace(self.target)
                    if exchange(self.path, self.target):
                        shutil.rmtree(self.path)      # now the replaced folder
                        break
                    aside = self.path + ".replaced"
                    os.rename(self.target, aside)
                    os.rename(self.path, self.target)
                    shutil.rmtree(aside)
                    break
                try:
                    os.rename(self.path, self.target)
                    break
                except OSError as error:        # another process put a folder there first
                    if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            _fsync(self.parent)
            self.done = True
        finally:
            self._release()

    def discard(self) -> None:
        """Remove the folder (a failed or interrupted write)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.remove(self._lock_path)
            os.close(self._lock)
            self._lock = None


def _fsync_file(path: str) -> None:
    if os.path.isfile(path) and not os.path.islink(path):
        _fsync(path)


def clean_leftovers(parent: str, kind: str) -> list[str]:
    """Remove ``parent``'s work folders of ``kind`` whose owners are gone (their lock file is
    free), and lock files without a folder; return what was removed. A folder without its lock
    file was not made by :class:`WorkFolder` and is left alone."""
    removed = []
    for lock_path in glob.glob(os.path.join(glob.escape(parent), f".*.{kind}-*.lock")):
        folder = lock_path[:-len(".lock")]
        try:
            descriptor = os.open(lock_path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            continue                            # its owner is alive
        try:
            aside = folder + ".replaced"
            target = os.path.join(parent, _target_name(os.path.basename(folder), kind))
            if os.path.isdir(aside) and not os.path.lexists(target):
                os.rename(aside, target)        # killed between the two renames: undo the first
            for path in (folder, aside):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            with contextlib.suppress(OSError):
                os.remove(lock_path)
        finally:
            os.close(descriptor)
    return removed


def _target_name(folder_name: str, kind: str) -> str:
    """The target's name from a work folder's ``.<target name>.<kind>-<random>``."""
    return folder_name[1:].rsplit(f".{kind}-", 1)[0]


@contextlib.contextmanager
def exclusive_lock(path: str):
    """Hold an ``flock`` on ``path`` (created if needed) for the block: one process at a time,
    across processes on this machine; released if the process dies."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


class UnwritablePlaceError(ValueError):
    """A folder the harness must write in that is a file, or cannot be written."""


def check_writable_folder(path: str, what: str) -> None:
    """Raise :class:`UnwritablePlaceError` unless ``path`` is a folder this process can write in,
    or can be created as one; checked with a temporary file that is removed at once, so nothing
    is left behind."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UnwritablePlaceError(f"{what} {path}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise UnwritablePlaceError(f"{what} {path} is not writable: {error.strerror} "
                                   f"({probe})") from None

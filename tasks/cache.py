"""A checksummed folder of state dicts that suites build once and reuse.

Each entry is a safetensors file; ``manifest.json`` (written atomically after every entry) holds
their sha256 and the recipe that produced them. An entry whose bytes no longer match is reported
and treated as absent, so it is rebuilt rather than used; so is a manifest that cannot be read
(damaged, not UTF-8, not the expected shape), with a warning naming it.

Processes share a cache safely: :meth:`CheckpointCache.ensure` builds an entry under a lock of
its own (``.locks/<entry>.lock``), so two first runs build it once, the second waiting and then
using the first's; the manifest is re-read and merged under its own lock before each write.

Every entry records the machine and environment that built it (``build``), and whether that was
the pinned environment of :mod:`harness.core.reproducible`. A pinned build treats an entry an
unpinned process built as missing, and replaces it: only pinned entries are the same bytes on
every machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings

from torch import Tensor

from harness.core.reproducible import is_pinned, machine_details
from harness.io.files import (UntrustedFileError, exclusive_lock, read_json_file, sha256_file,
                              write_json_atomic)
from harness.io.lazy import LazyStateDict
from harness.core.tensors import StateDict


class CheckpointCache:
    """State dicts by name in ``folder``, each verified against its recorded checksum."""

    def __init__(self, folder: str, recipe: dict, *, pinned_only: bool | None = None) -> None:
        self.folder = folder
        self.pinned_only = is_pinned() if pinned_only is None else pinned_only
        self.recipe = json.loads(json.dumps(recipe, sort_keys=True))  # as it reads back
        self._manifest_path = os.path.join(folder, "manifest.json")
        self._entries: dict[str, dict] = self._read_entries()
        self._verified: set[str] = set()

    def _read_entries(self) -> dict[str, dict]:
        """The manifest's entries for this recipe ({} when there is none, another recipe's, or
        a manifest that cannot be read: those entries are rebuilt)."""
        if not os.path.exists(self._manifest_path):
            return {}
        try:
            manifest = read_json_file(self._manifest_path, "cache manifest", 64 << 20)
        except (OSError, UntrustedFileError) as error:
            warnings.warn(f"{error}: rebuilding the cache entries", stacklevel=3)
            return {}
        entries = manifest.get("entries") if isinstance(manifest, dict) else None
        if not isinstance(entries, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries.values()):
            warnings.warn(f"cache manifest {self._manifest_path} is not a cache manifest: "
                          "rebuilding the cache entries", stacklevel=3)
            return {}
        return entries if manifest.get("recipe") == self.recipe else {}

    def path(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.safetensors")

    def has(self, name: str) -> bool:
        """True when the state dict ``name`` exists and matches its recorded checksum."""
        return self.has_file(self.path(name))

    def has_file(self, path: str) -> bool:
        """True when the file exists and its bytes match the recorded checksum."""
        key = os.path.basename(path)
        if key in self._verified:
            return True
        entry = self._entries.get(key)
        if entry is None or not os.path.isfile(path):
            return False
        if self.pinned_only and not self.pinned(path):
            return False
        if sha256_file(path) != entry["sha256"]:
            warnings.warn(f"cache entry {path} does not match its checksum: it will be rebuilt")
            del self._entries[key]
            return False
        self._verified.add(key)
        return True

    def pinned(self, path: str) -> bool:
        """Whether the entry of ``path`` (an entry name's path, or a file) was built pinned."""
        entry = self._entries.get(os.path.basename(path)) or {}
        build = entry.get("build")
        return isinstance(build, dict) and build.get("pinned") is True

    def _lock(self, name: str):
        return exclusive_lock(os.path.join(self.folder, ".locks", f"{name}.lock"))

    def record_file(self, path: str, **info) -> None:
        """Record a file written into the cache folder (atomically, by the caller), merging
        with entries other processes recorded meanwhile."""
        key = os.path.basename(path)
        entry = {"sha256": sha256_file(path), "build": machine_details(), **info}
        with self._lock("manifest"):
            self._entries = {**self._read_entries(), key: entry}
            write_json_atomic(self._manifest_path, {"recipe": self.recipe,
                                                    "entries": self._entries})
        self._verified.add(key)

    def put(self, name: str, state_dict: dict[str, Tensor], **info) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.folder)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp)
            os.replace(tmp, self.path(name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        self.record_file(self.path(name), **info)

    def ensure(self, name: str, build, **info) -> bool:
        """Make sure entry ``name`` exists: under its lock, re-read the manifest and, when the
        entry is still missing, ``put(name, build(), **info)``. True when this call built it."""
        return self.ensure_file(self.path(name), lambda: self.put(name, build(), **info))

    def ensure_file(self, path: str, build) -> bool:
        """:meth:`ensure` for a file the caller writes itself: ``build()`` writes ``path``
        (atomically) and records it (:meth:`record_file`). True when this call built it."""
        if self.has_file(path):
            return False
        os.makedirs(self.folder, exist_ok=True)
        with self._lock(os.path.basename(path)):
            self._entries = self._read_entries()       # another process may have built it
            if self.has_file(path):
                return False
            build()
            return True

    def get(self, name: str) -> StateDict:
        if not self.has(name):
            raise KeyError(f"{name!r} is not in the cache at {self.folder}")
        return LazyStateDict(self.path(name))

    def info(self, name: str) -> dict:
        return dict(self._entries[os.path.basename(self.path(name))])

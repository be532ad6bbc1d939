"""A checksummed folder of state dicts that suites build once and reuse.

Each entry is a safetensors file; ``manifest.json`` (written atomically after every entry) holds
their sha256 and the recipe that produced them. An entry whose bytes no longer match is reported
and treated as absent, so it is rebuilt rather than used.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

from torch import Tensor

from harness.files import sha256_file, write_json_atomic
from harness.state_dict import LazyStateDict, StateDict


class CheckpointCache:
    """State dicts by name in ``folder``, each verified against its recorded checksum."""

    def __init__(self, folder: str, recipe: dict) -> None:
        self.folder = folder
        self.recipe = json.loads(json.dumps(recipe, sort_keys=True))  # as it reads back
        self._manifest_path = os.path.join(folder, "manifest.json")
        self._entries: dict[str, dict] = {}
        if os.path.exists(self._manifest_path):
            try:
                with open(self._manifest_path, encoding="utf-8") as f:
                    manifest = json.load(f)
                if manifest.get("recipe") == self.recipe:
                    self._entries = manifest.get("entries", {})
            except (json.JSONDecodeError, OSError):
                warnings.warn(f"cache manifest {self._manifest_path} is corrupt: rebuilding")
        self._verified: set[str] = set()

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
        if entry is None or not os.path.exists(path):
            return False
        if sha256_file(path) != entry["sha256"]:
            warnings.warn(f"cache entry {path} does not match its checksum: it will be rebuilt")
            del self._entries[key]
            return False
        self._verified.add(key)
        return True

    def record_file(self, path: str, **info) -> None:
        """Record a file written into the cache folder (atomically, by the caller)."""
        key = os.path.basename(path)
        self._entries[key] = {"sha256": sha256_file(path), **info}
        self._verified.add(key)
        write_json_atomic(self._manifest_path, {"recipe": self.recipe, "entries": self._entries})

    def put(self, name: str, state_dict: dict[str, Tensor], **info) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.folder)
        os.close(fd)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp)
        os.replace(tmp, self.path(name))
        self.record_file(self.path(name), **info)

    def get(self, name: str) -> StateDict:
        if not self.has(name):
            raise KeyError(f"{name!r} is not in the cache at {self.folder}")
        return LazyStateDict(self.path(name))

    def info(self, name: str) -> dict:
        return dict(self._entries[os.path.basename(self.path(name))])

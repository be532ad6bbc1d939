"""Model weights read lazily from safetensors files: one tensor at a time, memory-mapped."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from torch import Tensor

from harness.core.errors import MergeInputError
from harness.io.files import UntrustedFileError, read_json_file
from harness.io.pages import MAPPED_PAGES, READ_AHEAD

def _open_checked(path: str):
    """A safetensors handle, or an error naming the file (missing, truncated, not safetensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as error:
        raise MergeInputError(f"cannot read the safetensors file {path}: {error}") from None


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

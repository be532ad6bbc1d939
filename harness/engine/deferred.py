"""Entries whose final values are decided only after the last key: held, spilled, then patched.

A merge that needs a whole-model statistic it only knows at the end (TIES's majority sign for
entries whose elected sign is 0) writes each key at once with its best guess applied, and leaves
here the undecided entries' flat positions and their possible values (one row per outcome). At
the end, :meth:`DeferredEntries.resolve` patches the keys whose guess was wrong, in memory or in
a shard file already written. Undecided entries wait in memory up to ``HELD_BYTES``, then in a
temporary folder (beside the output when it is streamed), so memory stays bounded whatever the
model size.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, MutableMapping

from torch import Tensor

from harness.engine.outputs import patch_tensor
from harness.io.pages import iter_keys
from harness.io.shards import ShardWriter

HELD_BYTES = 2**29    # undecided entries kept in memory until the majority sign is known


class HeldEntries:
    """Undecided entries waiting for the majority sign, key by key: in memory up to
    ``HELD_BYTES``, then spilled to safetensors files in ``folder`` (a temporary folder)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.held: dict[str, tuple[Tensor, Tensor]] = {}
        self.spilled: dict[str, str] = {}
        self.held_bytes = 0
        self._files = itertools.count()

    def add(self, key: str, positions: Tensor, candidates: Tensor) -> None:
        size = positions.numel() * positions.element_size() + \
            candidates.numel() * candidates.element_size()
        if self.held_bytes + size <= HELD_BYTES:
            self.held[key] = positions, candidates
            self.held_bytes += size
        else:
            self._spill(key, positions, candidates)

    def _spill(self, key: str, positions: Tensor, candidates: Tensor) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.folder, f"{next(self._files):06d}.safetensors")
        save_file({"positions": positions, "candidates": candidates}, path)
        self.spilled[key] = path

    def keys(self) -> list[str]:
        return [*self.held, *self.spilled]

    def take(self, key: str) -> tuple[Tensor, Tensor]:
        """A key's ``(positions, candidates)``, given up once taken."""
        from safetensors.torch import load_file

        if key in self.held:
            return self.held.pop(key)
        path = self.spilled.pop(key)
        loaded = load_file(path)
        os.remove(path)
        return loaded["positions"], loaded["candidates"]


class DeferredEntries:
    """Undecided entries of the keys written to ``output``; use as a context manager (the
    spill folder is removed on exit)."""

    def __init__(self, output: MutableMapping) -> None:
        self.output = output
        streamed_to = output.directory if isinstance(output, ShardWriter) else None
        beside = os.path.dirname(os.path.abspath(streamed_to)) if streamed_to else None
        self._folder = tempfile.TemporaryDirectory(prefix=".deferred-entries-", dir=beside)
        self.waiting = HeldEntries(self._folder.name)
        self.guesses: dict[str, int | None] = {}

    def __enter__(self) -> DeferredEntries:
        return self

    def __exit__(self, *exc) -> None:
        self._folder.cleanup()

    def write(self, key: str, value: Tensor, undecided: tuple[Tensor, Tensor] | None,
              guess: int | None) -> None:
        """Write ``value`` as ``output[key]``. ``undecided``: flat positions and their values
        per outcome (``(outcomes, n)``, in the key's dtype), or None; ``guess`` (an outcome, or
        None to leave ``value`` as it is there) is applied before writing."""
        if undecided is not None:
            positions, options = undecided
            self.guesses[key] = guess
            if guess is not None:
                patch_tensor(value, positions, options[guess])
            self.waiting.add(key, positions, options)
        self.output[key] = value

    def resolve(self, outcome: int | None, fallback: Callable[[str, Tensor], Tensor],
                desc: str, progress: bool) -> None:
        """Patch every key whose guess was not ``outcome``: with that outcome's values, or
        ``fallback(key, positions)`` when ``outcome`` is None."""
        wrong = [key for key in self.waiting.keys() if self.guesses[key] != outcome]
        for key in iter_keys(wrong, desc, progress):
            positions, options = self.waiting.take(key)
            self.output.patch(key, positions, options[outcome] if outcome is not None
                              else fallback(key, positions))

"""A long merge's saved progress, so that a run stopped part way resumes where it stopped.

An iterative merge (AdaMerging's entropy steps: hours on a CPU) saves the state it needs to
continue (its coefficients, its optimizer's moments, the next step) every so often; a run that
is killed, preempted or timed out and then started again continues from there instead of from
the start, and ends with the bits an uninterrupted run ends with, since the state is saved
whole and the steps are deterministic.

The file is untrusted input when read back:

- it is a safetensors file (reading one runs no code) of bounded size, written atomically, whose
  metadata names this format and a fingerprint of everything the state depends on (the method
  and its hyperparameters, the suite and its models, the environment);
- a file of this format with another fingerprint (another setting, other models, another
  environment) is set aside: the merge starts over and replaces it, the harness having written it;
- a file that is not of this format, or cannot be read, is never used nor replaced: the error
  names it and the problem.
"""

from __future__ import annotations

import os
import time

from torch import Tensor

from harness.io.files import write_bytes_atomic

FORMAT = "merge-harness-resume"
MAX_BYTES = 1 << 30


class ResumeFileError(ValueError):
    """A resume file that cannot be used: its path and the problem."""


class ResumeState:
    """The resume file at ``path`` for the merge ``fingerprint`` identifies.

    :meth:`load` returns the saved tensors (None when there is nothing to resume from);
    :meth:`save` writes them atomically, at most once per ``interval`` seconds unless ``final``;
    :meth:`discard` removes the file once the run's records are written. ``resumed_from`` is set
    by the merge to the step it continued from (None when it started afresh)."""

    def __init__(self, path: str, fingerprint: str, *, interval: float = 30.0) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.interval = interval
        self.resumed_from: int | None = None
        self._saved_at = time.monotonic()

    def _read(self) -> tuple[dict[str, str], dict[str, Tensor]]:
        from safetensors import safe_open

        size = os.stat(self.path).st_size
        if size > MAX_BYTES:
            raise ResumeFileError(f"{self.path}: {size} bytes, more than a resume file holds "
                                  f"({MAX_BYTES}); remove it to start the merge over")
        try:
            with safe_open(self.path, "pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as error:
            raise ResumeFileError(f"{self.path}: not a readable safetensors file "
                                  f"({type(error).__name__}: {error}); remove it to start the "
                                  "merge over") from None
        return metadata, tensors

    def load(self) -> dict[str, Tensor] | None:
        """The saved tensors, or None when there is no file or it is another merge's."""
        if not os.path.lexists(self.path):
            return None
        if not os.path.isfile(self.path) or os.path.islink(self.path):
            raise ResumeFileError(f"{self.path}: not a regular file; remove it to start the "
                                  "merge over")
        metadata, tensors = self._read()
        if metadata.get("format") != FORMAT:
            raise ResumeFileError(f"{self.path}: not a resume file of merge-harness (format "
                                  f"{metadata.get('format')!r}); remove it or use another "
                                  "--cache-dir")
        if metadata.get("fingerprint") != self.fingerprint:
            return None                 # another merge's progress: started over, replaced
        return tensors

    def save(self, tensors: dict[str, Tensor], *, final: bool = False) -> None:
        """Write ``tensors`` (CPU, contiguous) atomically, when ``interval`` seconds have passed
        since the last write or ``final``."""
        now = time.monotonic()
        if not final and now - self._saved_at < self.interval:
            return
        if os.path.lexists(self.path):
            self.load()                 # raises rather than replace a file that is not ours
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"format": FORMAT, "fingerprint": self.fingerprint})
        write_bytes_atomic(self.path, data)
        self._saved_at = now

    def discard(self) -> None:
        """Remove the file (only one of this format: checked before)."""
        if os.path.isfile(self.path) and not os.path.islink(self.path):
            try:
                metadata, _ = self._read()
            except ResumeFileError:
                return
            if metadata.get("format") == FORMAT:
                os.remove(self.path)


"""Progress on long loops, honest in a terminal and in a log file alike.

In a terminal: one tqdm bar per level, cleaned up when done (``leave=False`` for inner levels).
Elsewhere (output redirected to a log, a Slurm job, CI), no bar at all, whose carriage returns
would pile up into one unreadable line, and for the loops worth following (``lines``) one line
per finished item with its time: a few summary lines, never thousands.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


def interactive() -> bool:
    """Whether progress goes to a terminal (stderr is a TTY)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def say(message: str, *, quiet: bool = False) -> None:
    """One line of what a run is doing, on stderr (beside the bars), unless ``quiet``."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def progress(items: Iterable, desc: str, *, enabled: bool = True, lines: bool = False,
             leave: bool = True, unit: str = "it", total: int | None = None) -> Iterator:
    """``items``, with a bar in a terminal, or with ``lines`` a line per item elsewhere
    (``desc: name done (i/n, s)``); nothing when not ``enabled``."""
    if not enabled:
        yield from items
        return
    if interactive():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, leave=leave, unit=unit, total=total)
        return
    if not lines:
        yield from items
        return
    items = list(items)
    start = time.perf_counter()
    for index, item in enumerate(items, start=1):
        yield item
        print(f"{desc}: {item} done ({index}/{len(items)}, {time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)

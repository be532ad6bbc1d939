"""Row blocks of a merge pass handed whole to Python threads that run torch single-threaded.

torch splits each CPU operation across its intra-op threads, which meet at the operation's end.
An elementwise merge is thousands of small block operations (a task vector, a sum, a check per
block and task), so every one of them waits for the slowest thread; when another job shares the
cores (a cluster node, a laptop) a thread the scheduler took away stalls every operation, and
the merge runs several times slower than the arithmetic needs. Handing each block whole to one
of N threads whose torch operations run single-threaded removes those meetings: a thread waits
only for its own work, and the blocks still stream in order with bounded memory.

The blocks of one pass must be independent (no state carried from block to block, as a
generator drawing in row order would), and each block's operations are the same as on one
thread, so the results are bit for bit those of the serial pass. Errors come out in block
order: the first failing block's error is raised, as the serial pass would.
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from harness.core.tensors import BlockBuffers, current_device


class BlockWorkers:
    """Runs ``fn(*args, buffers=...)`` per block (or per key), inline or on threads, and hands
    results back in submission order.

    ``parallel``: whether the caller's blocks are independent. The threads used are torch's
    intra-op thread count when the pass starts (``torch.set_num_threads`` chooses it); one
    thread, a merge device other than the CPU (whose operations are queued, not waited for), or
    ``parallel=False`` run every block inline with torch's own threads, exactly as before. While
    threads run, torch's intra-op count is 1 for the whole process and restored on exit.
    ``buffers`` is the calling thread's :class:`BlockBuffers`, reused from block to block.
    At most ``2 * threads`` blocks are in flight, so memory stays bounded by a few blocks.
    """

    def __init__(self, parallel: bool) -> None:
        threads = torch.get_num_threads()
        self.threads = threads if parallel and threads > 1 and current_device().type == "cpu" else 1
        self._local = threading.local()
        # (a block's future or None, what to call with its result or after it)
        self._pending: deque[tuple[Future | None, Callable | None]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._restore = threads

    def buffers(self) -> BlockBuffers:
        """This thread's scratch buffers."""
        found = getattr(self._local, "buffers", None)
        if found is None:
            found = self._local.buffers = BlockBuffers()
        return found

    def __enter__(self) -> BlockWorkers:
        if self.threads > 1:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="merge-block")
            torch.set_num_threads(1)
        return self

    def run(self, fn: Callable, *args, then: Callable | None = None) -> None:
        """Run ``fn(*args, buffers=...)`` (after the oldest in flight finished, once the
        window is full); with ``then``, call ``then(result)`` on this thread once it and every
        block run before it are done (results consumed in order)."""
        if self._executor is None:
            result = fn(*args, buffers=self.buffers())
            if then is not None:
                then(result)
            return
        while len(self._pending) >= 2 * self.threads:
            self._next()
        context = contextvars.copy_context()       # the merge device, the output target
        future = self._executor.submit(context.run, lambda: fn(*args, buffers=self.buffers()))
        self._pending.append((future, then))

    def then(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on this thread once every block run before it is done (storing a
        finished key, in key order)."""
        if self._pending:
            self._pending.append((None, fn))
        else:
            fn()

    def _next(self) -> None:
        future, then = self._pending.popleft()
        if future is None:
            then()
        elif then is None:
            future.result()
        else:
            then(future.result())

    def wait(self) -> None:
        """Wait for every block in flight and every call after them, raising the first failure
        in block order."""
        while self._pending:
            self._next()

    def __exit__(self, kind, error, trace) -> None:
        if self._executor is None:
            return
        try:
            if error is None:
                self.wait()
            else:                               # an earlier block's failure comes first
                for future, _ in self._pending:
                    if future is not None and future.exception() is not None:
                        raise future.exception() from error
        finally:
            for future, _ in self._pending:
                if future is not None:
                    future.cancel()
            self._executor.shutdown(wait=True)
            self._pending.clear()
            torch.set_num_threads(self._restore)

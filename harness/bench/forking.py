"""A worker process that loads torch, transformers and the harness once, then runs each sweep
job in a fresh child forked from it.

A sweep on one machine runs many short jobs; started as new interpreters, each would spend
seconds importing torch and transformers before its merge begins. The worker imports them once
(with the environment the sweep asks for: pinned or not, set before torch loads) and forks one
child per job, so every job still runs in a process of its own: a crash or an out-of-memory
kill takes only that child, nothing a job leaves behind reaches the next, and its peak memory
is its own. That peak counts the shared-library pages the job touches, not all those a new
interpreter's imports touch, so it can be lower than a single run's; records say which kind of
process measured them (``provenance.process``). The worker itself runs no torch operation, so
no thread pool exists when it forks.

The worker's arguments name the suites it will serve; it imports each one's ``warm_imports``
too (the model classes transformers would import in every job). Protocol, one JSON object per
line: the parent writes ``{"main": "harness.bench.cli", "argv": [...], "threads": N}`` on the
worker's stdin (the module whose ``main(argv)`` the child runs, imported by the worker once); the
worker answers ``{"code": C, "message": M}`` on its stdout when the child ends (``C`` negative: the
signal that killed it; ``M``: the child's last error line). The worker exits at the end of its
input (Ctrl-C stops its child, not the worker, which ends when the sweep closes its input).
Where the system cannot fork (Windows), jobs run as new interpreters
(:func:`harness.bench.sweep.run_cell_process`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

PRELOAD = ("torch", "numpy", "safetensors", "transformers", "harness.bench.runner",
           "harness.bench.records")


def available() -> bool:
    return hasattr(os, "fork") and sys.platform != "win32"


class ForkingWorker:
    """The parent's handle on one worker process (started on first use, restarted when it
    dies); one job at a time, so each thread of a sweep owns one."""

    def __init__(self, env: dict[str, str] | None = None, suites: tuple[str, ...] = ()) -> None:
        self.env, self.suites = env, tuple(suites)
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "harness.bench.forking", *self.suites], env=self.env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        return self._process

    def run(self, main: str, argv: list[str], threads: int | None = None) -> tuple[int, str]:
        """Run ``main(argv)`` of the module ``main`` in a child of the worker: (exit code, last
        error line)."""
        with self._lock:
            process = self._start()
            request = {"main": main, "argv": argv, "threads": threads}
            try:
                process.stdin.write(json.dumps(request) + "\n")
                process.stdin.flush()
                answer = process.stdout.readline()
            except (BrokenPipeError, OSError):
                answer = ""
            if not answer:                      # the worker itself died
                code = process.wait()
                self._process = None
                return (code if code < 0 else 1,
                        f"error: the sweep's worker process ended (exit code {code})")
            reply = json.loads(answer)
            return int(reply["code"]), str(reply["message"])

    def close(self) -> None:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.stdin.close()
                self._process.wait()
            self._process = None


# ---- the worker process ----------------------------------------------------------------------
def die_with_parent(parent: int) -> None:
    """On Linux, end this process (SIGTERM) when ``parent``, the process that started it, ends
    for any reason: a sweep killed by a signal Ctrl-C does not send (``kill``, a scheduler's
    SIGTERM or SIGKILL) leaves no worker, and so no job, running. Elsewhere nothing is done."""
    import signal

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    if os.getppid() != parent:          # it ended before the line above: end now
        os.kill(os.getpid(), signal.SIGTERM)


def _serve(requests, replies, suites: list[str]) -> None:
    import importlib
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C stops the jobs; the worker ends

    for name in PRELOAD:
        importlib.import_module(name)
    from harness.bench.provenance import git_commit
    from harness.core.registry import SUITES

    for suite in suites:                # what the suites' evaluations import on first use
        for name in getattr(SUITES.get(suite), "warm_imports", ()):
            try:
                importlib.import_module(name)
            except ImportError:         # an optional extra not installed: the job says so
                pass

    git_commit()                # the children name the commit of the code loaded here
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        code, message = _fork_job(importlib.import_module(request["main"]).main,
                                  request["argv"], request.get("threads"))
        replies.write(json.dumps({"code": code, "message": message}) + "\n")
        replies.flush()


def _fork_job(main, argv: list[str], threads: int | None) -> tuple[int, str]:
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as errors:
        sys.stdout.flush()
        sys.stderr.flush()
        worker = os.getpid()
        pid = os.fork()
        if pid == 0:                                        # the child: one job, then exit
            code = 1
            try:
                import signal

                die_with_parent(worker)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.dup2(errors.fileno(), 2)
                code = _child(main, argv, threads)
            except BaseException:                           # noqa: BLE001 - reported below
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
        _, status = os.waitpid(pid, 0)
        errors.seek(0)
        return os.waitstatus_to_exitcode(status), last_error_line(errors.read())


def last_error_line(stderr: str) -> str:
    """A job's last ``error:`` line (what the harness prints for an error it names), else its
    last line of output, else ""."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    marked = [line for line in lines if line.startswith("error:")]
    return (marked or lines or [""])[-1]


def _child(main, argv: list[str], threads: int | None) -> int:
    from harness.bench import provenance
    from harness.core.reproducible import is_pinned

    provenance.process_start = "forked"

    if threads and not is_pinned():
        import torch

        torch.set_num_threads(threads)
    return main(argv)


if __name__ == "__main__":
    die_with_parent(os.getppid())
    _serve(sys.stdin, sys.stdout, [name for name in sys.argv[1:] if name])

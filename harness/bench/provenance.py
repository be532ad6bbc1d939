"""Where a record comes from: the code's commit, the packages, the machine, the kind of process,
and the peak memory a run reads. Every run record stores :func:`run_provenance`."""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import resource
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

from harness.core.reproducible import is_pinned, machine_details


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("merge-harness", "numpy", "safetensors", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


CODE_PATHS = ("harness", "methods", "tasks", "pyproject.toml", "constraints.txt")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes to the code that runs,
    :data:`CODE_PATHS`, not to the leaderboards a sweep renders meanwhile), read once per
    process: :func:`harness.bench.runner.run_splits` reads it when it starts, so a record
    written an hour later names the code that ran, not a commit made meanwhile."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + ("-dirty" if code_changed(root) else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_changed(folder: str) -> bool:
    """Whether the git checkout holding ``folder`` has uncommitted changes to tracked files of
    :data:`CODE_PATHS` (paths from the checkout's root)."""
    return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *(f":/{path}" for path in CODE_PATHS)], cwd=folder,
                               capture_output=True, text=True, timeout=5).stdout.strip())


# How this process began, stored with every record because peak memory counts from there:
# "interpreter" (a new Python: the pages its imports touched count), "forked" (a child of a
# sweep's worker, harness.bench.forking: shared-library pages count once the job touches them).
process_start = "interpreter"


def run_provenance(suite, device: str) -> dict:
    """What every record stores about the run: when, which code, packages, device, machine,
    kind of process, and the suite's own provenance."""
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "versions": _versions(), "device": device,
            "process": process_start,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "reproducible": is_pinned(), "host": machine_details(),
            "suite": suite.provenance()}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: Linux's ``VmHWM``, which counts this
    program's own address space only (``ru_maxrss`` also carries over the peak of the process
    that started it, through fork and exec); ``ru_maxrss`` elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to what it holds now (Linux: writing 5 to
    ``/proc/self/clear_refs``), so a later figure is that of the work that follows; False
    where the system offers no reset."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False

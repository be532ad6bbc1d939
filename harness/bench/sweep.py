"""``harness sweep``: a leaderboard's grid (suites x methods x splits x seeds x hyperparameters)
in one command, on this machine, a Ray cluster or Slurm.

The grid is expanded and every cell validated before anything runs (unknown names, with near
matches; hyperparameter values). A cell whose record exists, measured on the suite's current
models, is skipped, so a sweep resumes after Ctrl-C, a crash or a lost node. Every other cell is
one ``harness run`` in a process of its own, so each record's peak memory is the cell's own, and
writes its record atomically where a single run would: a sweep's records are those of single
runs. The first cell of each suite runs alone (it builds the suite and measures its reference
models once); the rest run in parallel. A cell that fails is retried once, then recorded as
failed (a small record with its error, listed under the leaderboard); a process killed by the
system (out of memory) is reported as such. Two sweeps sharing a results folder never run one
cell twice: each claims a cell before running it (a ``<record>.claim`` file). Then the
leaderboards are rendered and a summary printed.

Executors: ``local`` (worker processes here, the default), ``ray`` (an existing cluster or a
local one; ``pip install ray``) and ``slurm`` (one job array through submitit; ``pip install
submitit``, whose local executor the tests use).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MAX_CELLS_WITHOUT_YES = 1000


@dataclasses.dataclass(frozen=True)
class Cell:
    suite: str
    method: str
    split: str
    seed: int = 0
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        sets = "".join(f" {k}={v}" for k, v in self.overrides)
        return f"{self.suite}/{self.split}/{self.method}{sets} seed {self.seed}"


@dataclasses.dataclass
class SweepOptions:
    results_dir: str
    cache_dir: str | None = None
    device: str = "cpu"
    reproducible: bool = False
    force: bool = False
    finetune_seed: int = 0
    workers: int | None = None
    executor: str = "local"
    address: str | None = None          # ray
    gpus_per_cell: float = 0            # ray, slurm
    partition: str | None = None        # slurm
    time_minutes: int = 60              # slurm
    log_dir: str | None = None          # slurm: a log per cell


@dataclasses.dataclass
class Outcome:
    cell: Cell
    status: str                         # done | skipped | not-applicable | failed | claimed
    seconds: float = 0.0
    error: str | None = None


def expand(suites: list[str], methods: list[str], splits: list[str], seeds: list[int],
           grid: dict[str, list[str]]) -> list[Cell]:
    """Every cell of the grid, names checked (near matches in the errors). A grid name applies
    to the methods that have that hyperparameter; seeds beyond the first only to methods with a
    random seed; the unseen split only to suites that have unseen tasks."""
    from harness import list_methods
    from harness.core.registry import METHODS, SUITES

    for split in splits:
        if split not in ("seen", "unseen"):
            raise ValueError(f"--splits takes seen and unseen, not {split!r}")
    names = list_methods() if methods in (["all"], []) else methods
    classes = {name: METHODS.get(name) for name in names}        # unknown: near matches
    suite_classes = {name: SUITES.get(name) for name in suites}
    hyper = {name: {h.name for h in cls.hyperparameters()} for name, cls in classes.items()}
    for key in grid:
        if not any(key in names_ for names_ in hyper.values()):
            known = sorted(set().union(*hyper.values()))
            close = difflib.get_close_matches(key, known, n=2, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"--grid {key}: no method of this sweep has a hyperparameter "
                             f"{key!r}.{hint}")
    cells = []
    for suite in suites:
        has_unseen = bool(getattr(suite_classes[suite], "unseen", ()))
        for method in names:
            keys = [k for k in grid if k in hyper[method]]
            method_seeds = seeds if "seed" in hyper[method] else seeds[:1]
            for split in splits:
                if split == "unseen" and not has_unseen:
                    continue
                for values in itertools.product(*(grid[k] for k in keys)):
                    for seed in method_seeds:
                        cells.append(Cell(suite, method, split, seed, tuple(zip(keys, values))))
    return cells


def run_argv(cell: Cell, options: SweepOptions) -> list[str]:
    """The ``harness`` arguments of one cell."""
    argv = ["run", "--method", cell.method, "--suite", cell.suite, "--split", cell.split,
            "--seed", str(cell.seed), "--results", options.results_dir, "--device",
            options.device, "--quiet"]
    for key, value in cell.overrides:
        argv += ["--set", f"{key}={value}"]
    argv += ["--cache-dir", options.cache_dir] if options.cache_dir else []
    argv += ["--finetune-seed", str(options.finetune_seed)] if options.finetune_seed else []
    argv += ["--reproducible"] if options.reproducible else []
    argv += ["--force"] if options.force else []
    return argv


def plan(cells: list[Cell], options: SweepOptions) -> list[tuple[Cell, str, bool]]:
    """(cell, its record's path, whether a stored record stands for it) for every cell,
    validated first: a bad value is an error naming the cell before anything runs."""
    from harness.bench.runner import RunConfig, plan_cell, stored_result

    planned = []
    for cell in cells:
        config = RunConfig(cell.method, cell.suite, cell.split, dict(cell.overrides), cell.seed,
                           options.device, options.results_dir, options.cache_dir,
                           finetune_seed=options.finetune_seed, quiet=True)
        try:
            suite, _, path = plan_cell(config)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{cell.label}: {error}") from None
        stored = (not options.force and os.path.exists(path)
                  and stored_result(path, suite)[0] is not None)
        planned.append((cell, path, stored))
    return planned


def default_workers() -> int:
    """Cells at once on this machine: one per two cores (each cell's torch uses the rest of
    its share), at most one per 4 GiB of memory, at least one."""
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 8 << 30
    return max(1, min(cores // 2 or 1, memory // (4 << 30)))


# ---- running one cell -------------------------------------------------------------------
def run_cell_process(argv: list[str], threads: int | None = None) -> tuple[int, str]:
    """Run ``harness <argv>`` in its own process: (exit code, its last error line). A negative
    exit code is the signal that killed it."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    child = subprocess.run([sys.executable, "-m", "harness.bench.cli", *argv], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return child.returncode, (errors or lines or [""])[-1]


def describe_failure(code: int, message: str) -> str:
    if code < 0 and -code == signal.SIGKILL:
        return "killed by the system (SIGKILL: out of memory?)"
    if code < 0:
        return f"killed by signal {-code}"
    return message.removeprefix("error: ") or f"exit code {code}"


CLAIM_SUFFIX = ".claim"
CLAIM_MAX_AGE_S = 24 * 3600     # another host's claim older than this is taken over


def claim(path: str) -> bool:
    """Claim the cell whose record is ``path`` for this process (a ``<record>.claim`` file
    created exclusively, naming host and pid), so two sweeps sharing a results folder never run
    one cell twice. A claim of a process that is gone (same host), or older than a day
    (another host), is taken over. False when another live sweep holds it."""
    import json
    import socket

    target = path + CLAIM_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(3):
        try:
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(target, encoding="utf-8") as f:
                    holder = json.loads(f.read(4096))
                host, pid, since = holder["host"], int(holder["pid"]), float(holder["time"])
            except (OSError, ValueError, KeyError, TypeError):
                host, pid, since = None, 0, 0.0         # unreadable: treat as abandoned
            if host == me["host"] and pid == me["pid"]:
                return True
            alive = (_process_alive(pid) if host == me["host"]
                     else time.time() - since < CLAIM_MAX_AGE_S)
            if alive and host is not None:
                return False
            try:
                os.remove(target)                       # abandoned: take it over
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return True
    return False


def release(path: str) -> None:
    try:
        os.remove(path + CLAIM_SUFFIX)
    except FileNotFoundError:
        pass


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def settle(cell: Cell, path: str, attempt: Callable[[], tuple[int, str]]) -> Outcome:
    """Run a cell (retried once after a failure) and say how it ended; a cell that fails twice
    gets a failed record at its path, which the next sweep runs again. A cell another live
    sweep has claimed is left to it (``claimed``)."""
    if not claim(path):
        return Outcome(cell, "claimed", 0.0, "another sweep is running it")
    try:
        return _settle(cell, path, attempt)
    finally:
        release(path)


def _settle(cell: Cell, path: str, attempt: Callable[[], tuple[int, str]]) -> Outcome:
    from harness.bench.records import RunRecord, read_record, write_record

    start = time.perf_counter()
    error = None
    for _ in range(2):
        code, message = attempt()
        if code == 0:
            return Outcome(cell, "done", time.perf_counter() - start)
        record, _ = read_record(path) if os.path.exists(path) else (None, None)
        if record is not None and record.status == "not-applicable":
            return Outcome(cell, "not-applicable", time.perf_counter() - start, record.reason)
        error = describe_failure(code, message)
    write_record(path, RunRecord(cell.suite, cell.split, cell.method, cell.method, cell.seed,
                                 dict(cell.overrides), status="failed", reason=error))
    return Outcome(cell, "failed", time.perf_counter() - start, error)


# ---- executors ----------------------------------------------------------------------------
def run_local(jobs: list[tuple[Cell, str]], options: SweepOptions, report) -> list[Outcome]:
    workers = options.workers or default_workers()
    threads = max(1, (os.cpu_count() or 1) // workers)
    outcomes: list[Outcome] = []
    firsts, rest = _first_of_each_suite(jobs)
    for cell, path in firsts:         # builds the suite and measures its references, alone
        outcomes.append(report(settle(cell, path, lambda c=cell: run_cell_process(
            run_argv(c, options)))))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(settle, cell, path, lambda c=cell: run_cell_process(
            run_argv(c, options), threads)) for cell, path in rest]
        for future in futures:
            outcomes.append(report(future.result()))
    return outcomes


def _claimed(group: list[tuple[Cell, str]], report, outcomes: list[Outcome]):
    """The cells of ``group`` this sweep could claim, before their jobs are submitted to a
    cluster (the others, claimed by another live sweep, are reported as such)."""
    mine = []
    for cell, path in group:
        if claim(path):
            mine.append((cell, path))
        else:
            outcomes.append(report(Outcome(cell, "claimed", 0.0, "another sweep is running it")))
    return mine


def _first_then_anew(first, submit, wait) -> Callable[[], tuple[int, str]]:
    """A cell's attempts on a cluster: the first waits for the job submitted with the others,
    a retry submits it anew."""
    pending = [first]

    def attempt():
        return wait(pending.pop() if pending else submit())
    return attempt


def run_ray(jobs: list[tuple[Cell, str]], options: SweepOptions, report) -> list[Outcome]:
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray: pip install -c constraints.txt "
                          "'merge-harness[ray]'") from None
    ray.init(address=options.address, ignore_reinit_error=True)
    remote = ray.remote(num_cpus=1, num_gpus=options.gpus_per_cell)(run_cell_process)
    outcomes: list[Outcome] = []
    for group in _first_of_each_suite(jobs):
        group = _claimed(group, report, outcomes)
        refs = [remote.remote(run_argv(cell, options)) for cell, _ in group]
        for (cell, path), ref in zip(group, refs):
            attempt = _first_then_anew(
                ref, lambda cell=cell: remote.remote(run_argv(cell, options)), ray.get)
            outcomes.append(report(settle(cell, path, attempt)))
    return outcomes


def run_slurm(jobs: list[tuple[Cell, str]], options: SweepOptions, report,
              executor=None) -> list[Outcome]:
    """One job array per stage (each suite's first cell, then the rest) through submitit; a
    log per cell in ``log_dir``. ``executor``: a submitit executor to use instead (the tests
    pass its local one)."""
    try:
        import submitit
    except ImportError:
        raise ImportError("--executor slurm needs submitit: pip install -c constraints.txt "
                          "'merge-harness[slurm]'") from None
    if executor is None:
        executor = submitit.AutoExecutor(folder=options.log_dir or os.path.join(
            options.results_dir, ".sweep-logs"), cluster="slurm")
        executor.update_parameters(timeout_min=options.time_minutes, cpus_per_task=2,
                                   slurm_partition=options.partition,
                                   gpus_per_node=int(options.gpus_per_cell) or None)

    def wait(job):
        try:
            return job.result()
        except Exception as error:        # the job itself died (node lost, timeout)
            return 1, f"error: slurm job {job.job_id}: {str(error).splitlines()[-1]}"

    outcomes: list[Outcome] = []
    for group in _first_of_each_suite(jobs):
        group = _claimed(group, report, outcomes)
        if not group:
            continue
        submitted = executor.map_array(run_cell_process,
                                       [run_argv(cell, options) for cell, _ in group])
        for (cell, path), job in zip(group, submitted):
            resubmit = lambda cell=cell: executor.submit(run_cell_process,  # noqa: E731
                                                          run_argv(cell, options))
            attempt = _first_then_anew(job, resubmit, wait)
            outcomes.append(report(settle(cell, path, attempt)))
    return outcomes


EXECUTORS = {"local": run_local, "ray": run_ray, "slurm": run_slurm}


def _first_of_each_suite(jobs):
    firsts, rest, seen = [], [], set()
    for cell, path in jobs:
        (rest if cell.suite in seen else firsts).append((cell, path))
        seen.add(cell.suite)
    return firsts, rest


def sweep(cells: list[Cell], options: SweepOptions, *, dry_run: bool = False,
          echo=print) -> list[Outcome]:
    """Plan, skip what is stored, run the rest with the chosen executor, render the
    leaderboards; returns every cell's outcome (skipped cells included)."""
    if options.executor not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, not "
                         f"{options.executor!r}")
    planned = plan(cells, options)
    todo = [(cell, path) for cell, path, stored in planned if not stored]
    skipped = [Outcome(cell, "skipped") for cell, _, stored in planned if stored]
    echo(f"{len(planned)} cells: {len(skipped)} with a stored record, {len(todo)} to run "
         f"({options.executor})")
    if dry_run:
        for cell, path, stored in planned:
            echo(f"  {'skip' if stored else 'run '}  {cell.label}  -> {path}")
        return skipped
    done = 0

    def report(outcome: Outcome) -> Outcome:
        nonlocal done
        done += 1
        tail = f": {outcome.error}" if outcome.error else ""
        echo(f"[{done}/{len(todo)}] {outcome.status:14} {outcome.cell.label} "
             f"({outcome.seconds:.0f} s){tail}")
        return outcome

    outcomes = EXECUTORS[options.executor](todo, options, report) if todo else []
    return skipped + outcomes


def summary(outcomes: list[Outcome]) -> list[str]:
    """Counts by status, then each failed cell with the first line of its error."""
    counts = {s: sum(o.status == s for o in outcomes)
              for s in ("done", "skipped", "not-applicable", "failed")}
    if any(o.status == "claimed" for o in outcomes):
        counts["left to another sweep"] = sum(o.status == "claimed" for o in outcomes)
    lines = ["sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    lines += [f"  failed: {o.cell.label}: {(o.error or '').splitlines()[0] if o.error else ''}"
              for o in outcomes if o.status == "failed"]
    return lines

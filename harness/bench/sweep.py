"""``harness sweep``: a leaderboard's grid (suites x methods x splits x seeds x hyperparameters)
in one command, on this machine, a Ray cluster or Slurm.

The grid is expanded and every cell validated before anything runs (unknown names, with near
matches; hyperparameter values). A cell whose record exists, measured on the suite's current
models, is skipped, so a sweep resumes after Ctrl-C, a crash or a lost node. The other cells
run as jobs: the splits of one method, seed and hyperparameters whose merges are the same (all
but a split whose hyperparameter validation chooses, as TALL-Mask's seen one) are one ``harness
run --split seen,unseen``, which merges once and writes each split's record as its single run
would; every other cell is a job of its own. Each job runs in a process of its own, so each
record's peak memory is its merge's own, and writes its records atomically: a sweep's records
are those of single runs. On this machine the processes are forked from a worker that has
loaded torch and the harness once (:mod:`harness.bench.forking`). The first job of each suite
runs alone (it builds the suite and measures its reference models once); the rest run in
parallel. A cell that fails is retried once, then recorded as failed (a small record with its
error, listed under the leaderboard); a process killed by the system (out of memory) is
reported as such. Two sweeps sharing a results folder never run one cell twice: each claims a
cell before running it (a ``<record>.claim`` file). Then the leaderboards are rendered and a
summary printed.

Executors: ``local`` (worker processes here, the default), ``ray`` (an existing cluster or a
local one; ``pip install ray``) and ``slurm`` (one job array through submitit; ``pip install
submitit``, whose local executor the tests use).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import queue
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


@dataclasses.dataclass(frozen=True)
class Job:
    """The cells one process runs: the splits of one method, seed and hyperparameters that
    share a merge, or one cell."""

    cells: tuple[Cell, ...]
    paths: tuple[str, ...]

    @classmethod
    def of(cls, item) -> Job:
        """A job from a job or a ``(cell, record path)`` pair."""
        return item if isinstance(item, Job) else cls((item[0],), (item[1],))

    @classmethod
    def of_pairs(cls, pairs: list[tuple[Cell, str]]) -> Job:
        return cls(tuple(cell for cell, _ in pairs), tuple(path for _, path in pairs))

    def pairs(self) -> list[tuple[Cell, str]]:
        return list(zip(self.cells, self.paths))


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


def run_argv(cells: Cell | list[Cell], options: SweepOptions) -> list[str]:
    """The ``harness`` arguments of one cell, or of the splits of one method, seed and
    hyperparameters (``--split seen,unseen``)."""
    cells = [cells] if isinstance(cells, Cell) else list(cells)
    cell = cells[0]
    argv = ["run", "--method", cell.method, "--suite", cell.suite, "--split",
            ",".join(c.split for c in cells),
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
    return [(cell, path, stored) for cell, path, stored, _ in _plan(cells, options)]


def cell_config(cell: Cell, options: SweepOptions):
    """The :class:`~harness.bench.runner.RunConfig` a cell of this sweep runs with."""
    from harness.bench.runner import RunConfig

    return RunConfig(cell.method, cell.suite, cell.split, dict(cell.overrides), cell.seed,
                     options.device, options.results_dir, options.cache_dir,
                     finetune_seed=options.finetune_seed, quiet=True)


def _plan(cells: list[Cell], options: SweepOptions) -> list[tuple[Cell, str, bool, bool]]:
    """:func:`plan`'s answers and whether the cell's merge can be shared with its other split
    (false where validation chooses a hyperparameter on this split)."""
    from harness.bench.runner import plan_cell, selected_by_validation, stored_result

    planned = []
    for cell in cells:
        config = cell_config(cell, options)
        try:
            suite, _method, path = plan_cell(config)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{cell.label}: {error}") from None
        stored = (not options.force and os.path.exists(path)
                  and stored_result(path, suite)[0] is not None)
        sharing = selected_by_validation(suite, _method, config) is None
        planned.append((cell, path, stored, sharing))
    return planned


def jobs_of(planned: list[tuple[Cell, str, bool]]) -> list[Job]:
    """The jobs that run ``planned`` cells (those with ``sharing``: ``(cell, path,
    sharing)``): cells differing only in their split, each sharing its merge, make one job;
    every other cell is a job alone, first (those choose hyperparameters by validation: the
    longest cells)."""
    groups: dict[tuple, list[tuple[Cell, str]]] = {}
    alone = []
    for cell, path, sharing in planned:
        if sharing:
            key = (cell.suite, cell.method, cell.seed, cell.overrides)
            groups.setdefault(key, []).append((cell, path))
        else:
            alone.append(Job((cell,), (path,)))
    return alone + [Job.of_pairs(group) for group in groups.values()]


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
    from harness.bench.forking import last_error_line

    child = subprocess.run([sys.executable, "-m", "harness.bench.cli", *argv], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return child.returncode, last_error_line(child.stderr)


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
    """Run one cell (retried once after a failure) and say how it ended: :func:`settle_job`
    for a job of one cell."""
    return settle_job(Job((cell,), (path,)), lambda cells: attempt())[0]


def settle_job(job: Job, attempt: Callable[[list[Cell]], tuple[int, str]]) -> list[Outcome]:
    """Run a job's cells (``attempt(cells)``: exit code and last error line of the process
    that ran them), retry the cells still without a record once, and say how each ended; a
    cell that fails twice gets a failed record at its path, which the next sweep runs again.
    A cell another live sweep has claimed is left to it (``claimed``)."""
    mine, outcomes = _claim_cells(job)
    try:
        return outcomes + (_settle(mine, attempt) if mine else [])
    finally:
        for _, path in mine:
            release(path)


def _stamp(path: str):
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _settle(pending: list[tuple[Cell, str]],
            attempt: Callable[[list[Cell]], tuple[int, str]]) -> list[Outcome]:
    from harness.bench.records import RunRecord, read_record, write_record

    start = time.perf_counter()
    outcomes: list[Outcome] = []
    error = None
    for _ in range(2):
        before = {path: _stamp(path) for _, path in pending}
        code, message = attempt([cell for cell, _ in pending])
        left = []
        for cell, path in pending:
            written = _stamp(path) not in (None, before[path])
            record = read_record(path)[0] if written else None
            if record is not None and record.status == "not-applicable":
                outcomes.append(Outcome(cell, "not-applicable", time.perf_counter() - start,
                                        record.reason))
            elif code == 0 or (record is not None and record.status != "failed"):
                outcomes.append(Outcome(cell, "done", time.perf_counter() - start))
            else:
                left.append((cell, path))
        pending = left
        if not pending:
            return outcomes
        error = describe_failure(code, message)
    for cell, path in pending:
        write_record(path, RunRecord(cell.suite, cell.split, cell.method, cell.method,
                                     cell.seed, dict(cell.overrides), status="failed",
                                     reason=error))
        outcomes.append(Outcome(cell, "failed", time.perf_counter() - start, error))
    return outcomes


# ---- executors ----------------------------------------------------------------------------
def run_local(jobs: list, options: SweepOptions, report) -> list[Outcome]:
    """Jobs (or ``(cell, path)`` pairs) on this machine, ``options.workers`` at once, each in
    a child of a worker that has loaded torch and the harness (:mod:`harness.bench.forking`),
    or in a new interpreter where the system cannot fork."""
    from harness.bench import forking
    from harness.core.reproducible import pinned_environment

    jobs = [Job.of(job) for job in jobs]
    workers = options.workers or default_workers()
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = pinned_environment() if options.reproducible else None
    suites = tuple(dict.fromkeys(job.cells[0].suite for job in jobs))
    idle: queue.SimpleQueue = queue.SimpleQueue()
    started: list = []

    def in_process(cells: list[Cell], threads_: int | None) -> tuple[int, str]:
        if not forking.available():
            return run_cell_process(run_argv(cells, options), threads_)
        try:
            worker = idle.get_nowait()
        except queue.Empty:
            worker = forking.ForkingWorker(env, suites)
            started.append(worker)
        try:
            return worker.run("harness.bench.cli", run_argv(cells, options), threads_)
        finally:
            idle.put(worker)

    def settle_reported(job, threads_):
        return [report(o) for o in settle_job(job, lambda cells: in_process(cells, threads_))]

    outcomes: list[Outcome] = []
    firsts, rest = _first_of_each_suite(jobs, options)
    try:
        for job in firsts:       # builds the suite and measures its references, alone
            outcomes += settle_reported(job, None)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done in [pool.submit(settle_reported, job, threads) for job in rest]:
                outcomes += done.result()
    finally:
        for worker in started:
            worker.close()
    return outcomes


def _claim_cells(job: Job) -> tuple[list[tuple[Cell, str]], list[Outcome]]:
    """(the job's cells this sweep could claim, ``claimed`` outcomes of those another live
    sweep holds)."""
    mine, others = [], []
    for cell, path in job.pairs():
        if claim(path):
            mine.append((cell, path))
        else:
            others.append(Outcome(cell, "claimed", 0.0, "another sweep is running it"))
    return mine, others


def _claimed(group: list[Job], report, outcomes: list[Outcome]) -> list[Job]:
    """The jobs of ``group`` with the cells this sweep could claim, before they are submitted
    to a cluster (the others, claimed by another live sweep, are reported as such)."""
    mine = []
    for job in group:
        cells, others = _claim_cells(job)
        outcomes += [report(outcome) for outcome in others]
        if cells:
            mine.append(Job.of_pairs(cells))
    return mine


def _first_then_anew(first, submit, wait) -> Callable[[list[Cell]], tuple[int, str]]:
    """A job's attempts on a cluster: the first waits for the job submitted with the others,
    a retry submits the cells left anew."""
    pending = [first]

    def attempt(cells):
        return wait(pending.pop() if pending else submit(cells))
    return attempt


def run_ray(jobs: list, options: SweepOptions, report) -> list[Outcome]:
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray: pip install -c constraints.txt "
                          "'merge-harness[ray]'") from None
    jobs = [Job.of(job) for job in jobs]
    ray.init(address=options.address, ignore_reinit_error=True)
    remote = ray.remote(num_cpus=1, num_gpus=options.gpus_per_cell)(run_cell_process)
    outcomes: list[Outcome] = []
    for group in _first_of_each_suite(jobs, options):
        group = _claimed(group, report, outcomes)
        refs = [remote.remote(run_argv(job.cells, options)) for job in group]
        for job, ref in zip(group, refs):
            attempt = _first_then_anew(
                ref, lambda cells: remote.remote(run_argv(cells, options)), ray.get)
            outcomes += [report(o) for o in settle_job(job, attempt)]
    return outcomes


def run_slurm(jobs: list, options: SweepOptions, report, executor=None) -> list[Outcome]:
    """One job array per stage (each suite's first job, then the rest) through submitit; a
    log per job in ``log_dir``. ``executor``: a submitit executor to use instead (the tests
    pass its local one)."""
    try:
        import submitit
    except ImportError:
        raise ImportError("--executor slurm needs submitit: pip install -c constraints.txt "
                          "'merge-harness[slurm]'") from None
    jobs = [Job.of(job) for job in jobs]
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

    def resubmit(cells):
        return executor.submit(run_cell_process, run_argv(cells, options))

    outcomes: list[Outcome] = []
    for group in _first_of_each_suite(jobs, options):
        group = _claimed(group, report, outcomes)
        if not group:
            continue
        submitted = executor.map_array(run_cell_process,
                                       [run_argv(job.cells, options) for job in group])
        for job, handle in zip(group, submitted):
            attempt = _first_then_anew(handle, resubmit, wait)
            outcomes += [report(o) for o in settle_job(job, attempt)]
    return outcomes


EXECUTORS = {"local": run_local, "ray": run_ray, "slurm": run_slurm}


def _first_of_each_suite(jobs: list[Job], options: SweepOptions
                         ) -> tuple[list[Job], list[Job]]:
    """(the jobs to run alone first, the rest): the first job of each suite that a run would
    build or measure references for, so that the others find it done; a suite already built,
    with its reference scores stored, needs no first job."""
    from harness.bench.references import suite_ready
    from harness.bench.runner import plan_cell

    firsts, rest, seen = [], [], set()
    for job in jobs:
        suite = job.cells[0].suite
        if suite not in seen:
            config = cell_config(job.cells[0], options)
            if not suite_ready(plan_cell(config)[0], config):
                firsts.append(job)
                seen.add(suite)
                continue
        rest.append(job)
        seen.add(suite)
    return firsts, rest


def sweep(cells: list[Cell], options: SweepOptions, *, dry_run: bool = False,
          echo=print) -> list[Outcome]:
    """Plan, skip what is stored, run the rest with the chosen executor, render the
    leaderboards; returns every cell's outcome (skipped cells included)."""
    if options.executor not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, not "
                         f"{options.executor!r}")
    planned = _plan(cells, options)
    todo = jobs_of([(cell, path, sharing) for cell, path, stored, sharing in planned
                    if not stored])
    skipped = [Outcome(cell, "skipped") for cell, _, stored, _ in planned if stored]
    running = sum(len(job.cells) for job in todo)
    echo(f"{len(planned)} cells: {len(skipped)} with a stored record, {running} to run "
         f"({options.executor}"
         + (f", {len(todo)} processes: the splits of a method share its merge)"
            if len(todo) < running else ")"))
    if dry_run:
        for cell, path, stored, _ in planned:
            echo(f"  {'skip' if stored else 'run '}  {cell.label}  -> {path}")
        return skipped
    done = 0

    def report(outcome: Outcome) -> Outcome:
        nonlocal done
        done += 1
        tail = f": {outcome.error}" if outcome.error else ""
        echo(f"[{done}/{running}] {outcome.status:14} {outcome.cell.label} "
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

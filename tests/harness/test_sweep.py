"""``harness sweep``: a grid expanded and checked first, stored cells skipped (resume), the rest
run as single runs would (records identical), failures retried then recorded, executors."""

import dataclasses
import json
import os
import sys

import pytest
import torch

from harness.bench.cli import main
from harness.bench.records import read_record, read_records
from harness.bench.sweep import (Cell, Outcome, SweepOptions, expand, plan, run_slurm, settle,
                                 summary, sweep)


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_grid_applies_names_to_the_methods_that_have_them():
    cells = expand(["tiny"], ["ties", "dare", "emr"], ["seen", "unseen"], [0, 1],
                   {"k": ["10", "20"], "p": ["0.3"]})
    labels = {c.label for c in cells}
    assert "tiny/seen/ties k=10 seed 0" in labels and "tiny/unseen/ties k=20 seed 0" in labels
    assert "tiny/seen/dare p=0.3 seed 1" in labels             # seeds: random methods only
    assert "tiny/seen/ties k=10 seed 1" not in labels
    assert "tiny/seen/emr seed 0" in labels and len(cells) == 2 * 2 + 2 * 2 + 2


@pytest.mark.parametrize("argv,message", [
    (["--methods", "tiez"], "unknown method 'tiez'. Did you mean 'ties'?"),
    (["--suite", "tinny"], "Did you mean 'tiny'?"),
    (["--grid", "kk=1"], "no method of this sweep has a hyperparameter 'kk'. Did you mean 'k'?"),
    (["--methods", "ties", "--grid", "k=500"], "tiny/seen/ties k=500 seed 0: ties: hyperparameter 'k' must"),
    (["--splits", "train"], "--splits takes seen and unseen"),
])
def test_bad_grids_are_refused_before_anything_runs(argv, message, tmp_path, capsys):
    args = ["sweep", "--suite", "tiny", "--results", str(tmp_path), "--dry-run", *argv]
    code, _, err = cli(capsys, *args)
    assert code == 2 and message in err
    assert not os.listdir(tmp_path)


def test_a_grid_of_over_1000_cells_asks_for_yes(capsys, tmp_path):
    values = ",".join(str(v) for v in range(1, 600))
    code, _, err = cli(capsys, "sweep", "--suite", "tiny", "--methods", "task-arithmetic",
                       "--grid", f"lam={values}", "--results", str(tmp_path), "--dry-run")
    assert code == 2 and "pass --yes" in err


def test_a_local_sweep_runs_resumes_and_matches_single_runs(tmp_path, tiny_cache, capsys):
    results = str(tmp_path / "results")
    args = ["sweep", "--suite", "tiny", "--methods", "task-arithmetic,ties", "--splits", "seen",
            "--results", results, "--cache-dir", tiny_cache, "--workers", "2"]
    code, out, _ = cli(capsys, *args)
    assert code == 0, out
    assert "sweep: 2 done, 0 skipped, 0 not-applicable, 0 failed" in out
    assert os.path.exists(tmp_path / "tiny.md")            # rendered beside the results
    swept = {r.method: r for r in read_records(os.path.join(results, "tiny", "seen"))[0]}
    single = str(tmp_path / "single")
    assert cli(capsys, "run", "--method", "ties", "--suite", "tiny", "--results", single,
               "--cache-dir", tiny_cache, "--quiet")[0] == 0
    alone = next(r for r in read_records(single)[0] if r.method == "ties")
    assert swept["ties"].tasks == alone.tasks and swept["ties"].adr == alone.adr
    assert os.path.basename(swept["ties"].path) == os.path.basename(alone.path)
    code, out, _ = cli(capsys, *args)                       # again: everything is stored
    assert code == 0 and "sweep: 0 done, 2 skipped" in out


def test_a_failing_cell_is_retried_then_recorded_and_run_again_later(tmp_path, tiny_cache):
    options = SweepOptions(str(tmp_path), tiny_cache)
    cell = Cell("tiny", "ties", "seen")
    (_, path, stored), = plan([cell], options)
    assert not stored
    calls = []

    def failing():
        calls.append(1)
        return 2, "error: something broke"
    outcome = settle(cell, path, failing)
    assert len(calls) == 2 and outcome.status == "failed"
    assert outcome.error == "something broke"
    record, _ = read_record(path)
    assert record.status == "failed" and record.reason == "something broke"
    assert not plan([cell], options)[0][2]                 # a failed cell is run again
    lines = summary([outcome, Outcome(Cell("tiny", "emr", "seen"), "done")])
    assert lines[0] == "sweep: 1 done, 0 skipped, 0 not-applicable, 1 failed"
    assert "tiny/seen/ties seed 0: something broke" in lines[1]
    from harness.bench.leaderboard import render_all
    board = render_all(str(tmp_path), str(tmp_path / "out"), "tiny")[0][0].text
    assert "Failed in a sweep" in board and "something broke" in board
    assert settle(cell, path, lambda: (-9, "")).error.startswith("killed by the system")


def test_a_cell_that_fails_once_succeeds_on_its_retry(tmp_path, tiny_cache):
    options = SweepOptions(str(tmp_path), tiny_cache)
    cell = Cell("tiny", "ties", "seen")
    (_, path, _), = plan([cell], options)
    results = iter([(1, "error: flaky"), (0, "")])
    assert settle(cell, path, lambda: next(results)).status == "done"


def test_the_slurm_executor_runs_a_job_array_through_submitit(tmp_path, tiny_cache):
    submitit = pytest.importorskip("submitit")
    options = SweepOptions(str(tmp_path / "results"), tiny_cache)
    cells = [Cell("tiny", "task-arithmetic", "seen"), Cell("tiny", "weight-averaging", "seen")]
    jobs = [(cell, path) for cell, path, _ in plan(cells, options)]
    executor = submitit.LocalExecutor(folder=str(tmp_path / "logs"))
    executor.update_parameters(timeout_min=10)
    outcomes = run_slurm(jobs, options, lambda o: o, executor=executor)
    assert [o.status for o in outcomes] == ["done", "done"]
    for _, path in jobs:
        assert read_record(path)[0].status == "measured"
    assert os.listdir(tmp_path / "logs")                   # a log per cell


def test_the_ray_executor_runs_cells_on_a_local_cluster(tmp_path, tiny_cache):
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False)
    except Exception as error:           # a sandbox without the shared memory Ray needs
        pytest.skip(f"Ray cannot start here: {error}")
    try:
        options = SweepOptions(str(tmp_path / "results"), tiny_cache, executor="ray")
        outcomes = sweep([Cell("tiny", "task-arithmetic", "seen")], options, echo=lambda _: 0)
        assert [o.status for o in outcomes] == ["done"]
    finally:
        ray.shutdown()


def test_executors_without_their_extra_say_how_to_install_it(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_extras(name, *args, **kwargs):
        if name in ("ray", "submitit"):
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_extras)
    from harness.bench.sweep import run_ray
    with pytest.raises(ImportError, match=r"merge-harness\[ray\]"):
        run_ray([(Cell("tiny", "ties", "seen"), "x")], SweepOptions(str(tmp_path)), print)
    with pytest.raises(ImportError, match=r"merge-harness\[slurm\]"):
        run_slurm([(Cell("tiny", "ties", "seen"), "x")], SweepOptions(str(tmp_path)), print)


def test_dry_run_lists_cells_and_what_is_stored(tmp_path, tiny_cache, capsys):
    results = str(tmp_path)
    assert cli(capsys, "run", "--method", "ties", "--suite", "tiny", "--results", results,
               "--cache-dir", tiny_cache, "--quiet")[0] == 0
    code, out, _ = cli(capsys, "sweep", "--suite", "tiny", "--methods", "ties,emr", "--splits",
                       "seen", "--results", results, "--cache-dir", tiny_cache, "--dry-run")
    assert code == 0 and "2 cells: 1 with a stored record, 1 to run" in out
    assert "skip  tiny/seen/ties seed 0" in out and "run   tiny/seen/emr seed 0" in out
    assert json.load(open(next(r.path for r in read_records(results)[0]
                               if r.method == "ties")))["status"] == "measured"


def test_two_sweeps_never_run_one_cell_twice(tmp_path, tiny_cache):
    """A cell claimed by another live sweep is left to it; the claim of a process that is
    gone is taken over."""
    import subprocess
    import sys

    from harness.bench.sweep import claim, release

    options = SweepOptions(str(tmp_path), tiny_cache)
    cell = Cell("tiny", "ties", "seen")
    (_, path, _), = plan([cell], options)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".claim", "w") as f:
            json.dump({"host": socket.gethostname(), "pid": other.pid, "time": 0}, f)
        ran = []
        outcome = settle(cell, path, lambda: ran.append(1) or (0, ""))
        assert outcome.status == "claimed" and not ran
        assert os.path.exists(path + ".claim")               # the other sweep's, kept
    finally:
        other.kill()
        other.wait()
    outcome = settle(cell, path, lambda: (0, ""))            # its holder is gone: taken over
    assert outcome.status == "done" and not os.path.exists(path + ".claim")
    assert claim(path) and claim(path)                       # our own claim, again
    release(path)
    assert not os.path.exists(path + ".claim")


def test_a_cluster_sweep_claims_cells_before_submitting_them(tmp_path, tiny_cache):
    """A cell another live sweep holds is never submitted to the cluster."""
    import socket
    import subprocess
    import sys

    submitit = pytest.importorskip("submitit")
    options = SweepOptions(str(tmp_path / "results"), tiny_cache)
    cells = [Cell("tiny", "task-arithmetic", "seen"), Cell("tiny", "weight-averaging", "seen")]
    jobs = [(cell, path) for cell, path, _ in plan(cells, options)]
    held = jobs[1][1]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        os.makedirs(os.path.dirname(held), exist_ok=True)
        with open(held + ".claim", "w") as f:
            json.dump({"host": socket.gethostname(), "pid": other.pid, "time": 0}, f)
        executor = submitit.LocalExecutor(folder=str(tmp_path / "logs"))
        executor.update_parameters(timeout_min=10)
        outcomes = run_slurm(jobs, options, lambda o: o, executor=executor)
    finally:
        other.kill()
        other.wait()
    assert sorted(o.status for o in outcomes) == ["claimed", "done"]
    assert not os.path.exists(held)                         # never run here
    assert not os.path.exists(jobs[0][1] + ".claim")        # ours released


def _measured(record):
    """What a record measured (not when, how fast or on which process)."""
    return (record.tasks, record.adr, record.amr, record.merge_info, record.stored_bytes_per_task,
            record.average_interval, record.adr_interval, record.hyperparameters)


def test_one_run_of_both_splits_merges_once_and_writes_the_single_runs_records(
        tmp_path, tiny_cache, monkeypatch):
    from harness.bench import runner
    from harness.bench.records import read_outcomes

    merges = []
    real = runner._merge
    monkeypatch.setattr(runner, "_merge",
                        lambda *a, **k: merges.append(a[1].name) or real(*a, **k))
    config = runner.RunConfig("dare", "tiny", results_dir=str(tmp_path / "both"),
                              cache_dir=tiny_cache, quiet=True)
    both = runner.run_splits(config, ["seen", "unseen"])
    assert [r.split for r in both] == ["seen", "unseen"] and merges == ["dare"]
    for record in both:
        alone = runner.run(dataclasses.replace(config, split=record.split,
                                               results_dir=str(tmp_path / "alone")))
        assert _measured(record) == _measured(alone)
        assert record.merge_seconds == both[0].merge_seconds          # one merge, timed once
        assert os.path.basename(record.path) == os.path.basename(alone.path)
        ours, theirs = read_outcomes(record)[0], read_outcomes(alone)[0]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[t]["score"], theirs[t]["score"]) for t in ours)
    merges.clear()                                      # TALL-Mask's seen lam is chosen per
    runner.run_splits(dataclasses.replace(config, method="tall-mask"), ["seen", "unseen"])
    assert merges == ["tall-mask", "tall-mask"]         # task: its splits merge differently
    assert runner.run_splits(config, ["unseen", "seen"])[0].split == "unseen"     # stored


def test_harness_run_takes_both_splits(tmp_path, tiny_cache, capsys):
    code, out, _ = cli(capsys, "run", "--method", "ties", "--suite", "tiny", "--split",
                       "seen,unseen", "--results", str(tmp_path), "--cache-dir", tiny_cache,
                       "--quiet")
    assert code == 0 and "(seen split)" in out and "(unseen split)" in out
    with pytest.raises(SystemExit):
        main(["run", "--method", "ties", "--suite", "tiny", "--split", "seen,train"])
    assert "splits are seen and unseen, not 'train'" in capsys.readouterr().err


def test_a_sweep_runs_the_splits_of_a_method_as_one_job(tmp_path, tiny_cache):
    from harness.bench.sweep import Job, _plan, jobs_of, run_argv

    options = SweepOptions(str(tmp_path), tiny_cache)
    cells = expand(["tiny"], ["ties", "tall-mask"], ["seen", "unseen"], [0], {})
    jobs = jobs_of([(c, p, sharing) for c, p, _, sharing in _plan(cells, options)])
    labels = [[c.label for c in job.cells] for job in jobs]
    assert labels == [["tiny/seen/tall-mask seed 0"],          # chooses lam: alone, first
                      ["tiny/seen/ties seed 0", "tiny/unseen/ties seed 0"],
                      ["tiny/unseen/tall-mask seed 0"]]
    argv = run_argv(list(jobs[1].cells), options)
    assert argv[argv.index("--split") + 1] == "seen,unseen"
    assert Job.of((cells[0], "p")).pairs() == [(cells[0], "p")]


def test_a_job_retries_only_its_cells_without_a_record(tmp_path, tiny_cache):
    from harness.bench.records import RunRecord, write_record
    from harness.bench.sweep import Job, settle_job

    options = SweepOptions(str(tmp_path), tiny_cache)
    planned = plan(expand(["tiny"], ["ties"], ["seen", "unseen"], [0], {}), options)
    job = Job(tuple(c for c, _, _ in planned), tuple(p for _, p, _ in planned))
    asked = []

    def attempt(cells):
        asked.append([c.split for c in cells])
        if len(asked) == 1:           # the first process writes the seen record, then fails
            write_record(job.paths[0], RunRecord("tiny", "seen", "ties", "ties",
                                                 status="not-applicable", reason="no rank"))
            return 1, "error: unseen broke"
        return 1, "error: unseen broke again"
    outcomes = settle_job(job, attempt)
    assert asked == [["seen", "unseen"], ["unseen"]]
    assert [(o.cell.split, o.status) for o in outcomes] == [("seen", "not-applicable"),
                                                            ("unseen", "failed")]
    assert outcomes[1].error == "unseen broke again"
    assert not any(os.path.exists(p + ".claim") for p in job.paths)


def test_the_forking_worker_runs_each_job_in_a_child_and_survives_its_death(tmp_path):
    import signal

    from harness.bench import forking

    if not forking.available():
        pytest.skip("this system cannot fork")
    worker = forking.ForkingWorker()
    try:
        assert worker.run("harness.bench.cli", ["ls", "suites"]) == (0, "")
        code, message = worker.run("harness.bench.cli", ["run", "--method", "tiez", "--suite",
                                                          "tiny", "--results", str(tmp_path)])
        assert code == 2 and message.startswith("error: unknown method 'tiez'")
        code, message = worker.run("tests.harness.killed_job", [])    # as out of memory
        assert code == -signal.SIGKILL and message == ""
        first = worker._process.pid
        os.kill(first, signal.SIGKILL)                  # the worker itself dies: said, restarted
        worker._process.wait()
        code, message = worker.run("harness.bench.cli", ["ls", "suites"])
        assert code == 0 and worker._process.pid != first
    finally:
        worker.close()


def test_a_suite_built_with_its_references_stored_needs_no_first_job(tmp_path, tiny_cache):
    from harness.bench import runner
    from harness.bench.sweep import _first_of_each_suite, _plan, jobs_of

    options = SweepOptions(str(tmp_path), tiny_cache)
    cells = expand(["tiny"], ["task-arithmetic", "weight-averaging"], ["seen"], [0], {})
    jobs = jobs_of([(c, p, sharing) for c, p, _, sharing in _plan(cells, options)])
    firsts, rest = _first_of_each_suite(jobs, options)
    assert len(firsts) == 1 and len(rest) == 1     # no reference scores stored: one job first
    runner.run(runner.RunConfig("ties", "tiny", results_dir=str(tmp_path),
                                cache_dir=tiny_cache, quiet=True))    # stores them
    assert _first_of_each_suite(jobs, options) == ([], jobs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux parent-death signal")
def test_a_sweep_killed_by_any_signal_leaves_no_worker_or_job(tmp_path):
    import subprocess
    import time

    pids = tmp_path / "pids"
    sweep = ("import os, sys, threading\n"
             "from harness.bench.forking import ForkingWorker\n"
             "worker = ForkingWorker()\n"
             "threading.Thread(target=worker.run, args=('tests.harness.sleeping_job', []),\n"
             "                 daemon=True).start()\n"
             "import time\n"
             "while worker._process is None: time.sleep(0.05)\n"
             f"open({str(pids)!r}, 'w').write(str(worker._process.pid))\n"
             "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", sweep], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 120
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = int(pids.read_text())
        children = []
        while not children and time.monotonic() < deadline:       # the job, forked
            time.sleep(0.2)
            found = subprocess.run(["pgrep", "-P", str(worker)], capture_output=True, text=True)
            children = [int(p) for p in found.stdout.split()]
        assert children
    finally:
        parent.kill()                                   # as a scheduler's SIGKILL would
        parent.wait()
    deadline = time.monotonic() + 30
    alive = [worker, *children]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert not alive

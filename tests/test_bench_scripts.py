"""The measuring scripts' workers on tiny checkpoints: docs/performance.md's figures come from them, so a
change that breaks one fails here rather than on the next benchmark run."""

import os

import pytest
import torch

from tests.conftest import load_script


def save_models(folder, n_tasks: int) -> None:
    """``make_models`` saved as bench_methods reads them (pretrained.safetensors, taskN...)."""
    from safetensors.torch import save_file

    from tests.conftest import make_models

    pretrained, finetuned = make_models(n_tasks=n_tasks)
    save_file({k: v.contiguous() for k, v in pretrained.items()},
              str(folder / "pretrained.safetensors"))
    for t, model in enumerate(finetuned.values()):
        save_file({k: v.contiguous() for k, v in model.items()},
                  str(folder / f"task{t}.safetensors"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")
def test_bench_scale_times_its_floors_and_a_merge_and_leaves_only_its_inputs(tmp_path):
    bench = load_script("bench_scale")
    shapes = {"model.embed_tokens.weight": (64, 16), "model.layers.0.mlp.up_proj.weight": (32, 16),
              "model.norm.weight": (16,)}
    bench.synthesize(str(tmp_path), shapes, 2, torch.bfloat16, shard_bytes=2048)
    assert len(os.listdir(tmp_path / "task0")) == 3          # two shards and their index
    for run in ("read", "read-float32", "write", "ties", "svd-floor"):
        row = bench.worker(run, str(tmp_path), 2, "cpu", None)
        assert row["seconds"] > 0 and row["peak_gib"] > 0 and row["gpu_gib"] is None, run
        assert row["hinted_gib"] >= 0, run
        assert row["cpu_s"] >= row["system_s"] >= 0, run      # os.times: 10 ms ticks
    assert sorted(os.listdir(tmp_path)) == ["pretrained", "task0", "task1"]   # outputs removed


def test_bench_scale_svd_floor_decomposes_large_matrices_in_blocks_as_dts_does(tmp_path,
                                                                            monkeypatch):
    import harness.methods.dts as dts
    from harness import LazyStateDict

    bench = load_script("bench_scale")
    shapes = {"model.embed_tokens.weight": (64, 16), "model.layers.0.mlp.down_proj.weight": (8, 32),
              "model.norm.weight": (16,)}
    bench.synthesize(str(tmp_path), shapes, 1, torch.bfloat16, shard_bytes=2**20)
    blocked, whole = [], []
    real_blocked = dts.blocked_truncated_svd

    def noted_blocked(delta, rank):
        blocked.append((delta.shape, rank))
        return real_blocked(delta, rank)
    monkeypatch.setattr(dts, "blocked_truncated_svd", noted_blocked)
    monkeypatch.setattr(dts, "truncated_svd", lambda delta, rank: whole.append(delta.shape))
    monkeypatch.setattr(dts, "IN_MEMORY_SVD_BYTES", 4 * 8 * 32)       # the smaller matrix
    pretrained = LazyStateDict(str(tmp_path / "pretrained"))
    bench.svd_floor(pretrained, {"task0": LazyStateDict(str(tmp_path / "task0"))}, "cpu")
    assert blocked == [((64, 16), dts.dts_rank(0.3, (64, 16)))]
    assert whole == [(8, 32)]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")
def test_bench_methods_worker_reports_time_memory_and_stored_bytes(tmp_path):
    bench = load_script("bench_methods")
    save_models(tmp_path, n_tasks=2)
    for run in ("read-inputs", "svd-floor"):
        assert bench.worker(run, str(tmp_path), 2)["seconds"] > 0
    ties, dts = (bench.worker(name, str(tmp_path), 2) for name in ("ties", "dts-d"))
    assert ties["bytes_per_task"] == 0 and ties["amr"] == 0
    assert dts["bytes_per_task"] > 0 and dts["amr"] > 0 and dts["amr_paper"] > 0


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_bench_scale_cold_runs_find_their_inputs_out_of_the_page_cache(tmp_path):
    from harness.io.pages import page_cached

    bench = load_script("bench_scale")
    (tmp_path / "task0").mkdir()
    path = tmp_path / "task0" / "model.safetensors"
    path.write_bytes(os.urandom(3 * 2**20))
    os.sync()
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.pread(descriptor, 2**20, 2**20)
        assert page_cached(descriptor, 2**20)
        bench.evict_inputs(str(tmp_path))
        assert not page_cached(descriptor, 2**20)
    finally:
        os.close(descriptor)


def test_bench_scale_memory_limit_makes_a_cgroup_and_moves_workers_in(tmp_path):
    bench = load_script("bench_scale")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/job\n0::/\n")
    (tmp_path / "memory" / "job").mkdir(parents=True)
    group = bench.MemoryCgroup(2**31, str(proc), str(tmp_path))
    with group:
        folder = tmp_path / "memory" / "job" / f"bench-scale-{os.getpid()}"
        assert (folder / "memory.limit_in_bytes").read_text() == str(2**31)
        group.join()
        assert (folder / "cgroup.procs").read_text() == str(os.getpid())
        for name in ("memory.limit_in_bytes", "cgroup.procs"):     # a real cgroup's files
            (folder / name).unlink()                               # go with it
    assert not folder.exists()
    proc.write_text("4:memory:/missing-parent\n")
    with pytest.raises(SystemExit, match="needs a memory cgroup this process can create"):
        with bench.MemoryCgroup(2**31, str(proc), str(tmp_path)):
            pass
    proc.write_text("3:cpu:/\n")
    with pytest.raises(SystemExit, match="no memory cgroup"):
        bench.MemoryCgroup(2**31, str(proc), str(tmp_path))


def test_bench_scale_repeated_runs_print_medians_ranges_and_largest_peaks(capsys):
    bench = load_script("bench_scale")
    runs = ["read", "read-float32", "write", "ties"]

    def worker_row(seconds, peak, gpu=None, hinted=None):
        return {"seconds": seconds, "cpu_s": 2 * seconds, "system_s": seconds / 4,
                "peak_gib": peak, "anon_gib": peak / 2, "file_gib": 0.1, "gpu_gib": gpu,
                "hinted_gib": hinted}
    results = {0: [worker_row(1.0, 2.0), worker_row(3.0, 2.5), worker_row(2.0, 2.0)],
               1: [worker_row(1.5, 2.0)] * 3,
               2: [worker_row(0.5, 1.0), worker_row(0.5, 1.0), worker_row(1.5, 1.0)],
               3: [worker_row(8.0, 0.5, hinted=1.5), worker_row(6.0, 0.75, hinted=2.0),
                   worker_row(7.0, 0.5, hinted=0.0)]}
    ties = bench.summarize(results[3])
    assert ties == {"seconds": 7.0, "low": 6.0, "high": 8.0, "cpu_s": 14.0, "system_s": 1.75,
                    "peak_gib": 0.75, "anon_gib": 0.375, "file_gib": 0.1, "gpu_gib": None,
                    "hinted_gib": 2.0}
    bench.print_row("ties", ties, results, runs, input_bytes=7 * 10**9)
    bench.print_row("read-float32", bench.summarize(results[1]), results, runs, 10**9)
    printed = capsys.readouterr().out.splitlines()
    # median 7.0 s over a median read of 2.0 s, and over 2.0 + a median write of 0.5 s
    assert printed[0] == ("| ties | 7.0 (6.0–8.0) | 14.0 (1.8) | 1.00 | 3.5 | 2.8 | 0.75 | 0.38 "
                          "| 0.10 | – | 2.00 |")
    assert printed[1] == ("| read-float32 | 1.5 | 3.0 (0.4) | 0.67 | 0.8 | – | 2.00 | 1.00 "
                          "| 0.10 | – | – |")


def test_bench_methods_rows_give_medians_and_name_a_failure():
    bench = load_script("bench_methods")
    runs = [{"seconds": s, "peak_gib": p, "bytes_per_task": 1234, "amr": 0.5, "amr_paper": 0.75}
            for s, p in ((2.0, 1.5), (1.0, 1.25), (4.0, 1.0))]
    assert (bench.method_row("dts-d", runs, floor_gib=1.0)
            == "| dts-d | 2.00 (1.00–4.00) | 1.50 | +0.50 | 1,234 | 0.500 | 0.75 |")
    assert (bench.method_row("ties", [{"seconds": 3.0, "peak_gib": 0.5, "bytes_per_task": 0,
                                       "amr": 0.0}], floor_gib=1.0)
            == "| ties | 3.00 | 0.50 | -0.50 | 0 | 0.000 |  |")
    assert bench.method_row("svd", runs + [{"error": "ValueError: bad"}], 1.0).startswith(
        "| svd | failed: ValueError: bad |")


def test_reproduce_records_names_every_difference(tmp_path):
    from harness.bench.records import AmrFigures, RunRecord, TaskScore, write_record

    script = load_script("reproduce_records")

    def record(folder, value, checkpoint="abc"):
        r = RunRecord("tiny", "seen", "ties", "ties", tasks={"t": TaskScore("accuracy", value)},
                      task_order=["t"], average=value, adr=1.0, amr=AmrFigures({"t": 0.0}, 0.0),
                      provenance={"suite": {"checkpoints": {"pretrained": checkpoint}},
                                  "created": str(folder)})
        return write_record(str(tmp_path / folder / "ties.json"), r).path

    same = script.compare(record("a", 0.5), record("b", 0.5))
    assert same == []                           # provenance dates are not compared
    moved = script.compare(record("c", 0.5, "def"), record("d", 0.4))
    assert any("tasks is" in line for line in moved) and any("sha256" in line for line in moved)
    assert script.compare(record("e", 0.5), str(tmp_path / "missing.json"))[0].endswith(
        "(the produced record has no checked-in counterpart)")


def test_bench_methods_plain_references_compute_the_methods_merges():
    """The plain-torch rows time the same merge as the method they stand beside."""
    from harness import get_method
    from tests.conftest import make_models

    bench = load_script("bench_methods")
    pretrained, finetuned = make_models(n_tasks=3)
    for plain, method, tolerance in (("plain-task-arithmetic", "task-arithmetic", 1e-6),
                                     ("plain-weight-averaging", "weight-averaging", 1e-6),
                                     ("plain-ties", "ties", 1e-6)):
        ours = get_method(method).merge(pretrained, finetuned).weights_for(next(iter(finetuned)))
        theirs = bench.PLAIN[plain](pretrained, finetuned)
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=tolerance)
    for plain, method, tolerance in (("plain-weight-averaging-float64", "weight-averaging", 0),
                                     ("plain-dare", "dare", 1e-6)):
        ours = get_method(method).merge(pretrained, finetuned).weights_for(next(iter(finetuned)))
        theirs = bench.PLAIN[plain](pretrained, finetuned)
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=tolerance)


def test_bench_methods_plain_mask_references_compute_the_methods_masks():
    from harness import get_method
    from tests.conftest import make_models

    bench = load_script("bench_methods")
    pretrained, finetuned = make_models(n_tasks=3)
    tau_uni, masks, lambdas = bench.PLAIN["plain-emr"](pretrained, finetuned)
    mtl, tall_masks = bench.PLAIN["plain-tall-mask"](pretrained, finetuned)
    for method, shared, task_masks in (("emr", tau_uni, masks), ("tall-mask", mtl, tall_masks)):
        result = get_method(method).merge(pretrained, finetuned)
        ours = next(iter(result.shared.values()))
        assert sorted(ours) == sorted(shared)
        for key in shared:
            torch.testing.assert_close(shared[key], ours[key].float(), rtol=0, atol=1e-6)
            for task in finetuned:
                stored = result.payloads[task].records[key].decode(torch.ones_like(ours[key]))
                assert torch.equal(stored.bool(), task_masks[task][key])
        if method == "emr":
            for task in finetuned:
                assert lambdas[task] == pytest.approx(float(result.payloads[task].scale),
                                                      rel=1e-5)


def test_bench_methods_worker_takes_hyperparameters(tmp_path):
    bench = load_script("bench_methods")
    save_models(tmp_path, n_tasks=2)
    run = bench.worker("dts-d:svd_solver=randomized,density=0.5", str(tmp_path), 2)
    assert run["info"]["density"] == 0.5 and run["bytes_per_task"] > 0


def test_bench_sweep_times_a_grid_into_a_fresh_folder(tmp_path, tiny_cache, monkeypatch, capsys):
    import sys

    bench = load_script("bench_sweep")
    kept = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["bench_sweep.py", "--suite", "tiny", "--methods",
                                      "task-arithmetic,ties", "--cache-dir", tiny_cache,
                                      "--keep", str(kept)])
    assert bench.main() == 0
    out = capsys.readouterr().out
    assert "4 cells: 0 with a stored record, 4 to run (local, 2 processes" in out
    assert "tiny: 4 cells in " in out and " s CPU in all processes" in out
    assert len(os.listdir(kept / "tiny" / "unseen")) == 4 * 2   # 2 methods, 2 references

"""Blocks of elementwise merges on Python threads (harness.engine.workers): the same bits, the
same errors in the same order, torch's thread count given back, outputs in key order."""

import threading

import pytest
import torch

import harness.core.tensors as tensors
from harness import get_method
from harness.core.errors import MergeInputError
from harness.engine.outputs import stream_outputs
from harness.engine.workers import BlockWorkers
from tests.conftest import make_models

PARALLEL = ["task-arithmetic", "weight-averaging"]


@pytest.fixture
def two_threads(monkeypatch):
    """Two intra-op threads (what the workers take over) and blocks of a few rows, so the
    test models' keys span several blocks in flight at once."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(tensors, "CHUNK_BYTES", 3 * 4 * 8 * 2)    # 2 rows of 8 for 3 tasks
    yield
    torch.set_num_threads(before)


def merge_both_ways(method, pretrained, finetuned, monkeypatch, **kwargs):
    cls = type(get_method(method))
    results = []
    for parallel in (False, True):
        monkeypatch.setattr(cls, "parallel_blocks", parallel)
        results.append(get_method(method).merge(pretrained, finetuned, **kwargs))
    return results


@pytest.mark.parametrize("method", PARALLEL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threaded_blocks_give_the_serial_bits(method, dtype, two_threads, monkeypatch):
    pretrained, finetuned = make_models(n_tasks=3, dtype=dtype)
    pretrained["wide.weight"] = torch.randn(64, 8).to(dtype)          # 32 blocks
    for task, model in finetuned.items():
        model["wide.weight"] = pretrained["wide.weight"] + 0.1 * torch.randn(64, 8).to(dtype)
    serial, threaded = merge_both_ways(method, pretrained, finetuned, monkeypatch)
    a, b = serial.weights_for("task0"), threaded.weights_for("task0")
    assert list(a) == list(b) == list(pretrained)                     # key order kept
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert serial.merged_params == threaded.merged_params
    assert torch.get_num_threads() == 2


def test_blocks_run_on_the_worker_threads_one_torch_thread_each(two_threads, monkeypatch):
    from methods.task_arithmetic import TaskArithmetic

    seen = []
    rule = TaskArithmetic.rule

    def spying_rule(self, spec):
        inner = rule(self, spec)

        def merge_block(key, theta0, taus, out):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return inner(key, theta0, taus, out)
        return merge_block

    monkeypatch.setattr(TaskArithmetic, "rule", spying_rule)
    monkeypatch.setenv("MERGE_HARNESS_NO_FUSED", "1")         # the torch rule, not the kernel
    TaskArithmetic().merge(*make_models())
    assert seen and all(name.startswith("merge-block") and n == 1 for name, n in seen)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)                            # one thread: every block inline
    seen.clear()
    TaskArithmetic().merge(*make_models())
    assert seen and all(name == threading.current_thread().name for name, _ in seen)


@pytest.mark.parametrize("method", PARALLEL)
def test_the_first_bad_block_is_named_as_the_serial_merge_names_it(method, two_threads,
                                                                   monkeypatch):
    pretrained, finetuned = make_models(n_tasks=3)
    finetuned["task1"]["layer.weight"][5, 3] = float("nan")      # the earlier key
    finetuned["task2"]["conv.weight"][0, 0, 0, 0] = float("inf")
    messages = []
    for parallel in (False, True):
        monkeypatch.setattr(type(get_method(method)), "parallel_blocks", parallel)
        with pytest.raises(MergeInputError) as error:
            get_method(method).merge(pretrained, finetuned)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert "layer.weight" in messages[0] and "task1" in messages[0]
    assert torch.get_num_threads() == 2                 # given back after the error too


def test_a_task_equal_to_the_pretrained_model_is_still_refused(two_threads):
    pretrained, finetuned = make_models(n_tasks=2)
    finetuned["task1"] = {k: v.clone() for k, v in pretrained.items()}
    with pytest.raises(MergeInputError, match="task1.*equals the pretrained model"):
        get_method("task-arithmetic").merge(pretrained, finetuned)


@pytest.mark.parametrize("method", PARALLEL)
def test_streamed_threaded_merges_write_every_key_complete(method, two_threads, tmp_path,
                                                           monkeypatch):
    pretrained, finetuned = make_models(n_tasks=3)
    in_memory = get_method(method).merge(pretrained, finetuned)
    with stream_outputs(tmp_path / "out", shard_bytes=600):
        streamed = get_method(method).merge(pretrained, finetuned)
    a, b = in_memory.weights_for("task0"), streamed.weights_for("task0")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failure_of_the_pass_itself_waits_for_blocks_in_flight_and_reports_theirs_first():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    order = []

    def block(index, *, buffers):
        order.append(index)
        if index == 1:
            raise ValueError("block 1 failed")

    try:
        with pytest.raises(ValueError, match="block 1 failed"):
            with BlockWorkers(parallel=True) as workers:
                for index in range(3):
                    workers.run(block, index)
                raise RuntimeError("the pass failed after its blocks were handed out")
        assert torch.get_num_threads() == 2
        with BlockWorkers(parallel=True) as workers:   # calls after blocks run in order
            calls = []
            for index in range(4):
                workers.run(block, index + 2)
                workers.then(lambda index=index: calls.append(index))
        assert calls == [0, 1, 2, 3]
    finally:
        torch.set_num_threads(before)



@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_passes_on_threads_give_the_one_thread_bits(stream, dtype, two_threads, tmp_path):
    """Validation, both threshold passes and the merge pass run their blocks (keys) on
    threads: the thresholds, the merged bits and the key order of one thread."""
    pretrained, finetuned = make_models(n_tasks=3, dtype=dtype)
    pretrained["wide.weight"] = torch.randn(64, 8).to(dtype)
    for model in finetuned.values():
        model["wide.weight"] = pretrained["wide.weight"] + 0.1 * torch.randn(64, 8).to(dtype)

    def merged(threads, folder):
        torch.set_num_threads(threads)
        try:
            if not stream:
                return get_method("ties").merge(pretrained, finetuned).weights_for("task0")
            with stream_outputs(tmp_path / folder, shard_bytes=600):
                return get_method("ties").merge(pretrained, finetuned).weights_for("task0")
        finally:
            torch.set_num_threads(2)

    one, two = merged(1, "one"), merged(2, "two")
    assert list(one) == list(two) == list(pretrained)
    assert all(torch.equal(one[k], two[k]) for k in one)

import json
import os

import pytest
import torch

from harness import MergeResult, ResultFormatError, get_method, list_methods
from harness.engine.storage import FORMAT_VERSION
from tests.conftest import make_models, merge_kwargs

OPTIONS = {"svd": {"density": 0.3}, "dts-t-star": {"budget": 60}, "dts-d-star": {"budget": 60}}


@pytest.mark.parametrize("name", sorted(set(list_methods())))
def test_save_load_round_trip_is_bit_exact(name, tmp_path):
    pre, ft = make_models()
    method = get_method(name, **OPTIONS.get(name, {}))
    result = method.merge(pre, ft, **merge_kwargs(method, ft))
    result.save(tmp_path / "r")
    loaded = MergeResult.load(tmp_path / "r")
    assert loaded.tasks == result.tasks and loaded.method == name
    for task in result.tasks:
        before, after = result.weights_for(task), loaded.weights_for(task)
        assert before.keys() == after.keys()
        for key in before:
            assert before[key].dtype == after[key].dtype
            assert torch.equal(before[key], after[key]), (task, key)
        assert loaded.stored_bytes(task) == result.stored_bytes(task)
    assert loaded.amr() == result.amr()


def test_stored_bytes_are_the_payload_files_tensor_bytes(tmp_path):
    pre, ft = make_models()
    result = get_method("dts-t").merge(pre, ft)
    result.save(tmp_path / "r")
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "r" / "task-000.safetensors")
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == \
        result.stored_bytes("task0")


def saved(tmp_path):
    pre, ft = make_models()
    get_method("t-switch").merge(pre, ft).save(tmp_path / "r")
    return tmp_path / "r"


def test_corrupt_payload_is_detected(tmp_path):
    path = saved(tmp_path)
    data = bytearray((path / "task-001.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "task-001.safetensors").write_bytes(bytes(data))
    with pytest.raises(ResultFormatError, match="task-001.safetensors.*checksum"):
        MergeResult.load(path)


def test_truncated_payload_is_detected(tmp_path):
    path = saved(tmp_path)
    data = (path / "base.safetensors").read_bytes()
    (path / "base.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultFormatError, match="base.safetensors"):
        MergeResult.load(path)


def test_newer_format_version_is_refused(tmp_path):
    path = saved(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResultFormatError, match="newer"):
        MergeResult.load(path)


def test_missing_manifest_reads_as_not_a_result(tmp_path):
    path = saved(tmp_path)
    os.remove(path / "manifest.json")
    with pytest.raises(ResultFormatError, match="no manifest.json"):
        MergeResult.load(path)


def test_failed_save_keeps_previous_result(tmp_path, monkeypatch):
    path = saved(tmp_path)
    before = (path / "manifest.json").read_text()
    pre, ft = make_models(seed=9)
    result = get_method("t-switch").merge(pre, ft)
    import harness.engine.storage as result_module

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(result_module, "sha256_file", broken)
    with pytest.raises(OSError):
        result.save(path)
    assert (path / "manifest.json").read_text() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_unknown_task_is_named():
    pre, ft = make_models()
    result = get_method("dts-t").merge(pre, ft)
    with pytest.raises(KeyError, match="'nope'"):
        result.weights_for("nope")


def test_unseen_weighting_is_weighted_sum_of_decoded_deltas():
    pre, ft = make_models()
    result = get_method("dts-d").merge(pre, ft)
    gamma = {"task0": 0.5, "task1": 0.3, "task2": 0.2}
    w = result.weights_for_unseen(gamma)
    key = "layer.weight"
    total = sum(g * result.payloads[t].delta(key, result.shared) for t, g in gamma.items())
    torch.testing.assert_close(w[key], result.base[key] + total)
    with pytest.raises(ValueError, match="gamma"):
        result.weights_for_unseen()

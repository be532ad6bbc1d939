"""``merge_device``: merges compute on another device key by key and store everything on the CPU.

No GPU is needed: :class:`tests.emulated_device.EmulatedDevice` makes the CPU play a second
device, and a method that forgot a device somewhere fails here the way it would on a GPU.
"""

import pytest
import torch
from torch import Tensor

from harness import get_method, merge_device
from harness.engine.codecs import Codec
from harness.engine.result import MergeResult
from harness.engine.passes import inspect_models
from tests.conftest import make_models
from tests.emulated_device import CUDA, EmulatedDevice


def stored_tensors(result: MergeResult):
    """Every tensor a result keeps: base, shared state dicts, payload codecs (nested)."""
    def codec_tensors(codec):
        for value in vars(codec).values():
            if isinstance(value, Tensor):
                yield value
            elif isinstance(value, Codec):
                yield from codec_tensors(value)
    yield from result.base.values()
    for shared in result.shared.values():
        yield from shared.values()
    for payload in result.payloads.values():
        for codec in payload.records.values():
            yield from codec_tensors(codec)
        if isinstance(payload.scale, Tensor):
            yield payload.scale


def test_the_emulator_catches_a_mismatch():
    with EmulatedDevice() as device:
        a = torch.ones(3).to("cuda")
        assert a.device == CUDA and not device.on_device(torch.ones(3))
        with pytest.raises(RuntimeError, match="same device"):
            a + torch.ones(3)
        b = torch.zeros(3, device=a.device)
        assert device.on_device(b) and device.on_device(a + b)
        assert not device.on_device((a + b).cpu())
        host = torch.empty(3)
        host[:] = a + b                               # a copy across devices is fine
        assert not device.on_device(host)


METHODS = [("weight-averaging", {}), ("task-arithmetic", {}), ("ties", {}), ("dare", {}),
           ("emr", {}), ("tall-mask", {}), ("t-switch", {}), ("svd", {"density": 0.5}),
           ("dts-t", {}), ("dts-d", {}), ("dts-d*", {"budget": 30.0})]   # budgets the tiny
                                                                         # models can meet


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merges_on_a_device_give_the_cpu_bits_and_store_on_the_cpu(method, params, dtype):
    pretrained, finetuned = make_models(dtype=dtype)
    on_cpu = get_method(method, **params).merge(pretrained, finetuned)
    with EmulatedDevice() as device, merge_device("cuda"):
        on_gpu = get_method(method, **params).merge(pretrained, finetuned)
        stored = list(stored_tensors(on_gpu))
        assert stored and not any(device.on_device(t) for t in stored)
    assert device.ops_on_device                        # the arithmetic did run there
    assert not device.casting_crossings                # results cross in their stored dtype
    if method.startswith(("dts", "svd")):
        assert "linalg_svd" in device.ops_on_device or "svd" in device.ops_on_device
    for task in on_cpu.tasks:
        a, b = on_cpu.weights_for(task), on_gpu.weights_for(task)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), task


def test_blocked_svd_runs_on_the_device_and_gives_the_cpu_bits(monkeypatch):
    import harness.methods.dts as dts

    monkeypatch.setattr(dts, "IN_MEMORY_SVD_BYTES", 0)           # every matrix in blocks
    pretrained, finetuned = make_models()
    on_cpu = get_method("dts-d").merge(pretrained, finetuned)
    with EmulatedDevice() as device, merge_device("cuda"):
        on_gpu = get_method("dts-d").merge(pretrained, finetuned)
        assert not any(device.on_device(t) for t in stored_tensors(on_gpu))
    assert any("eigh" in op for op in device.ops_on_device)
    for task in on_cpu.tasks:
        a, b = on_cpu.weights_for(task), on_gpu.weights_for(task)
        assert all(torch.equal(a[k], b[k]) for k in a), task


def test_validation_runs_on_the_device_and_reports_the_same():
    pretrained, finetuned = make_models()
    with EmulatedDevice() as device, merge_device("cuda"):
        spec = inspect_models(pretrained, finetuned)
    assert "count_nonzero" in device.ops_on_device
    assert spec == inspect_models(pretrained, finetuned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_counts_its_thresholds_on_the_device(dtype):
    """Adding each block's counts to a histogram on the CPU would be a CPU operation between GPU
    waits (after which OpenMP's idle threads spin): the histograms stay on the device."""
    from harness.methods.ties import inspect_for_ties

    pretrained, finetuned = make_models(dtype=dtype)
    spec, thresholds = inspect_for_ties(pretrained, finetuned)
    on_cpu = thresholds.finish(pretrained, finetuned, spec, 20.0, False, "ties")
    with EmulatedDevice() as device, merge_device("cuda"):
        spec, thresholds = inspect_for_ties(pretrained, finetuned)
        on_gpu = thresholds.finish(pretrained, finetuned, spec, 20.0, False, "ties")
        selectors = list(thresholds.selectors.values())
        assert selectors and all(device.on_device(s.high) for s in selectors)
        assert all(device.on_device(s.low) for s in selectors if s.needs_low)
    assert any(s.needs_low for s in selectors) == (dtype == torch.float32)
    assert on_gpu == on_cpu


def test_the_default_is_the_cpu():
    pretrained, finetuned = make_models()
    with EmulatedDevice() as device:
        get_method("dts-d").merge(pretrained, finetuned)
    assert not device.ops_on_device

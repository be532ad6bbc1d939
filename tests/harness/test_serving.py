"""Serving from one base: in-place task switching and the low-rank forward path."""

import pytest
import torch
from torch import nn

from harness import get_method
from tests.emulated_device import EmulatedDevice


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 6)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.inp(x))))


def models(n=3):
    torch.manual_seed(0)
    base = Net()
    pretrained = {k: v.detach().clone() for k, v in base.state_dict().items()}
    finetuned = {}
    for t in range(n):
        g = torch.Generator().manual_seed(t + 1)
        finetuned[f"t{t}"] = {k: v + 0.05 * torch.randn(v.shape, generator=g)
                              for k, v in pretrained.items()}
    return pretrained, finetuned


def loaded(state):
    net = Net()
    net.load_state_dict({k: v.clone() for k, v in state.items()})
    return net.eval()


@pytest.mark.parametrize("method", ["dts-d", "dts-t", "emr", "tall-mask", "t-switch"])
def test_apply_switches_in_place_and_undo_is_exact(method):
    pretrained, finetuned = models()
    result = get_method(method).merge(pretrained, finetuned)
    model = loaded(result.base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for task in result.tasks:
        expected = result.weights_for(task)
        pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
        with result.apply(model, task):
            state = model.state_dict()
            assert all(torch.equal(state[k], expected[k]) for k in expected)
            assert {k: v.data_ptr() for k, v in state.items()} == pointers   # in place
        assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_low_rank_path_matches_the_materialized_task_model():
    pretrained, finetuned = models()
    result = get_method("dts-d", density=0.5).merge(pretrained, finetuned)
    model = loaded(result.base)
    x = torch.randn(5, 12)
    with torch.no_grad():
        base_out = model(x)
        for task in result.tasks:
            reference = loaded(result.weights_for(task))(x)
            weights = model.inp.weight.clone()
            handle = result.attach_low_rank(model, task)
            assert torch.equal(model.inp.weight, weights)   # the matrix itself is untouched
            assert torch.allclose(model(x), reference, atol=1e-5)
            handle.undo()
            assert torch.equal(model(x), base_out)


def test_shared_results_switch_nothing_and_bad_models_are_named():
    pretrained, finetuned = models()
    result = get_method("ties").merge(pretrained, finetuned)
    model = loaded(result.base)
    with result.apply(model, "t0"):
        assert all(torch.equal(v, result.base[k]) for k, v in model.state_dict().items())
    wrapped = nn.Sequential(loaded(result.base))
    with pytest.raises(KeyError, match="prefix"):
        result.apply(wrapped, "t0")
    result.apply(wrapped, "t0", prefix="0.").undo()
    with pytest.raises(KeyError, match="t9"):
        result.apply(model, "t9")


def on_device_copy(state):
    """A module holding ``state`` as buffers on the device, nested by the keys' dotted names
    (buffers keep the very tensors given, so the emulator's tags stay on them)."""
    root = nn.Module()
    for key, value in state.items():
        owner = root
        *path, name = key.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(name, value.to("cuda"))
    return root


@pytest.mark.parametrize("method", ["dts-d", "emr"])
def test_a_model_on_a_device_switches_there(method):
    pretrained, finetuned = models()
    result = get_method(method).merge(pretrained, finetuned)
    with EmulatedDevice() as device:
        model = on_device_copy(result.base)
        for task in result.tasks:
            expected = result.weights_for(task)
            with result.apply(model, task):
                state = dict(model.named_buffers())
                assert all(device.on_device(v) for v in state.values())
                assert all(torch.equal(state[k].cpu(), expected[k]) for k in expected)
            assert all(torch.equal(v.cpu(), result.base[k])
                       for k, v in model.named_buffers())


def test_keeping_codes_serves_the_same_outputs_for_about_the_stored_bytes():
    pretrained, finetuned = models()
    result = get_method("dts-d", density=0.5).merge(pretrained, finetuned)
    model = loaded(result.base)
    x = torch.randn(5, 12)
    low_rank = [c for c in result.payloads["t0"].records.values() if hasattr(c, "u")]
    with torch.no_grad():
        with result.attach_low_rank(model, "t0") as factors:
            expected = model(x)
        with result.attach_low_rank(model, "t0", keep="codes") as codes:
            assert torch.equal(model(x), expected)
    assert codes.held_bytes == sum(c.nbytes for c in low_rank)
    assert factors.held_bytes == sum(4 * (c.u.shape[0] + c.v.shape[1]) * c.s.numel()
                                     for c in low_rank)
    with pytest.raises(ValueError, match="keep"):
        result.attach_low_rank(model, "t0", keep="bits")


@pytest.mark.parametrize("method,params", [("dts-t", {"grouping": "vector"}), ("dts-t", {}),
                                           ("t-switch", {}), ("svd", {"density": 0.5})])
def test_codecs_decode_on_the_device_they_are_moved_to(method, params):
    pretrained, finetuned = models()
    pretrained["sparse"] = torch.zeros(40)          # exact zeros: stored apart, as positions
    for t, model in enumerate(finetuned.values()):
        model["sparse"] = torch.zeros(40)
        model["sparse"][t::7] = 0.1 * (t + 1)
    result = get_method(method, **params).merge(pretrained, finetuned)
    with EmulatedDevice() as device:
        for codec in result.payloads["t0"].records.values():
            moved = codec.to("cuda")
            decoded = moved.decode()
            assert device.on_device(decoded) and not device.on_device(codec.decode())
            assert torch.equal(decoded.cpu(), codec.decode())

import pytest
import torch

from harness import get_method
from tests.conftest import make_models


def test_weight_averaging_of_identical_models_returns_the_model():
    pre, ft = make_models(n_tasks=1)
    same = {f"copy{i}": ft["task0"] for i in range(7)}
    result = get_method("weight-averaging").merge(pre, same)
    for key, value in ft["task0"].items():
        assert torch.equal(result.base[key], value), key


def test_weight_averaging_is_the_mean(models):
    pre, ft = models
    result = get_method("weight-averaging").merge(pre, ft)
    expected = sum(m["layer.weight"].double() for m in ft.values()) / 3
    assert torch.equal(result.base["layer.weight"], expected.float())
    assert result.stored_bytes("task0") == 0 and result.amr() == {t: 0.0 for t in ft}


def test_task_arithmetic_formula():
    pre = {"w": torch.tensor([1.0, 2.0])}
    ft = {"a": {"w": torch.tensor([2.0, 2.0])}, "b": {"w": torch.tensor([1.0, 4.0])}}
    assert get_method("task-arithmetic", lam=0.5).merge(pre, ft).base["w"].tolist() == [1.5, 3.0]
    assert get_method("task-arithmetic").merge(pre, ft).base["w"].tolist() == \
        pytest.approx([1.3, 2.6])


def test_dare_is_seeded_rescaled_and_reduces_to_ta_at_p0(models):
    pre, ft = models
    a = get_method("dare", seed=1).merge(pre, ft).base
    b = get_method("dare", seed=1).merge(pre, ft).base
    c = get_method("dare", seed=2).merge(pre, ft).base
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layer.weight"], c["layer.weight"])
    ta = get_method("task-arithmetic").merge(pre, ft).base
    p0 = get_method("dare", p=0.0).merge(pre, ft).base
    assert all(torch.equal(ta[k], p0[k]) for k in ta)


def test_dare_survivors_are_scaled_by_inverse_keep_rate():
    pre = {"w": torch.zeros(10000)}
    ft = {"a": {"w": torch.ones(10000)}}
    merged = get_method("dare", p=0.75, lam=1.0).merge(pre, ft).base["w"]
    values = set(merged.unique().tolist())
    assert values == {0.0, 4.0}
    assert abs(float((merged == 0).float().mean()) - 0.75) < 0.02


@pytest.mark.parametrize("with_out", [False, True])
def test_task_arithmetic_gives_the_bits_of_the_formula(with_out):
    from harness.methods.task_arithmetic import task_arithmetic

    g = torch.Generator().manual_seed(5)
    theta0 = torch.randn(3001, generator=g)
    taus = [torch.randn(3001, generator=g) * 1e-3 for _ in range(3)]
    originals = [t.clone() for t in (theta0, *taus)]
    out = torch.empty(3001) if with_out else None
    merged = task_arithmetic(theta0, taus, 0.3, out)
    expected = theta0 + 0.3 * (taus[0] + taus[1] + taus[2])
    assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))
    assert all(torch.equal(a, b) for a, b in zip((theta0, *taus), originals))


@pytest.mark.parametrize("with_buffers", [False, True])
def test_dare_drops_give_the_bits_of_the_formula(with_buffers):
    """``tau * (rand >= p) / (1 - p)``, in scratch or not, with zeros of both signs."""
    from harness.core.tensors import BlockBuffers
    from harness.methods.dare import drop_and_rescale

    buffers = BlockBuffers() if with_buffers else None
    for n in (5001, 2000):                             # scratch reused by a smaller block
        tau = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-3
        tau[:300] = -0.0
        original = tau.clone()
        dropped = drop_and_rescale(tau, 0.3, torch.Generator().manual_seed(7), buffers)
        expected = tau * (torch.rand(n, generator=torch.Generator().manual_seed(7)) >= 0.3) / 0.7
        assert torch.equal(dropped.view(torch.int32), expected.view(torch.int32))
        assert torch.equal(tau, original)


def test_dare_seed_zero_golden_bits():
    # survivors scaled by 2: 2 = only task a kept, 4 = only b, 6 = both, 0 = neither.
    # Pins the per-(seed, task, key) seeding: a change here changes every published DARE row.
    pre = {"w": torch.zeros(12)}
    ft = {"a": {"w": torch.ones(12)}, "b": {"w": torch.full((12,), 2.0)}}
    merged = get_method("dare", lam=1.0, seed=0).merge(pre, ft).base["w"]
    assert merged.tolist() == [2.0, 6.0, 2.0, 2.0, 0.0, 2.0, 4.0, 0.0, 6.0, 6.0, 2.0, 2.0]


@pytest.mark.parametrize("method", ["task-arithmetic", "weight-averaging", "dare"])
def test_row_blocks_give_the_same_bits(models, method, monkeypatch):
    """DARE's blocks draw their masks in row order from one generator per (task, key)."""
    import harness.core.tensors as state_dict

    pre, ft = models
    whole = get_method(method).merge(pre, ft).base
    monkeypatch.setattr(state_dict, "CHUNK_BYTES", 1)          # one row per block
    blocks = get_method(method).merge(pre, ft).base
    assert whole.keys() == blocks.keys()
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)

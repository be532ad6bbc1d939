"""Iso-C, Iso-CTS and TSV-M: bit for bit FusionBench's arithmetic (transcribed in
``fusionbench_reference``) on the same inputs, the isotropy each promises, and bad input."""

import pytest
import torch

from harness import HyperparameterError, get_method
from tests.conftest import make_models
from tests.methods import fusionbench_reference as reference

CASES = [
    ("iso-c", {}, reference.iso_c, {}),
    ("iso-c", {"alpha": 1.3}, reference.iso_c, {}),
    ("iso-cts", {}, reference.iso_cts, {"common_space_fraction": 0.8}),
    ("iso-cts", {"common_space_fraction": 0.5, "alpha": 0.7}, reference.iso_cts,
     {"common_space_fraction": 0.5}),
    ("tsv-m", {}, reference.compute_and_sum_svd_mem_reduction, {}),
    ("tsv-m", {"alpha": 0.6}, reference.compute_and_sum_svd_mem_reduction, {}),
]


def wider_models(n_tasks):
    """make_models plus matrices large enough for several directions per task."""
    pretrained, finetuned = make_models(n_tasks=n_tasks, seed=3)
    g = torch.Generator().manual_seed(9)
    pretrained["mlp.weight"] = torch.randn(48, 24, generator=g)
    pretrained["proj.weight"] = torch.randn(16, 40, generator=g)
    for model in finetuned.values():
        for key in ("mlp.weight", "proj.weight"):
            model[key] = pretrained[key] + 0.05 * torch.randn(pretrained[key].shape, generator=g)
    return pretrained, finetuned


@pytest.mark.parametrize("n_tasks", [3, 4])
@pytest.mark.parametrize("name,hyperparameters,merge,options", CASES)
def test_bit_for_bit_the_reference_arithmetic(name, hyperparameters, merge, options, n_tasks):
    pretrained, finetuned = wider_models(n_tasks)
    ours = get_method(name, **hyperparameters).merge(pretrained, finetuned).base
    theirs = reference.merged_model(pretrained, finetuned, merge,
                                    alpha=hyperparameters.get("alpha", 1.0), **options)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert torch.equal(ours["position_ids"], pretrained["position_ids"])


@pytest.mark.parametrize("name", ["iso-c", "iso-cts"])
def test_isotropic_merges_have_one_singular_value(name):
    pretrained, finetuned = wider_models(4)
    merged = get_method(name).merge(pretrained, finetuned).base
    for key in ("mlp.weight", "proj.weight", "layer.weight"):
        s = torch.linalg.svdvals((merged[key] - pretrained[key]).double())
        assert float(s.max() - s.min()) < 1e-5 * float(s.max()), key


def test_tsv_keeps_each_tasks_singular_values():
    pretrained, finetuned = wider_models(4)
    merged = get_method("tsv-m").merge(pretrained, finetuned).base
    delta = (merged["mlp.weight"] - pretrained["mlp.weight"]).double()
    kept = []
    for model in finetuned.values():                         # 24 // 4 = 6 per task
        kept += torch.linalg.svdvals((model["mlp.weight"] - pretrained["mlp.weight"]))[:6]
    expected = torch.sort(torch.stack(kept).double(), descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(delta), expected, rtol=1e-4, atol=1e-6)


def test_bad_hyperparameters_are_named():
    with pytest.raises(HyperparameterError, match="iso-cts.*common_space_fraction"):
        get_method("iso-cts", common_space_fraction=1.5)
    for name in ("iso-c", "iso-cts", "tsv-m"):
        with pytest.raises(HyperparameterError, match=f"{name}.*alpha"):
            get_method(name, alpha=-1)


# ---- Model Stock and BitDelta ------------------------------------------------------------
@pytest.mark.parametrize("n_tasks", [2, 3, 5])
def test_model_stock_is_the_reference_bit_for_bit(n_tasks):
    pretrained, finetuned = wider_models(n_tasks)
    ours = get_method("model-stock").merge(pretrained, finetuned).base
    floats = [k for k, v in pretrained.items() if v.is_floating_point()]
    theirs = reference.model_stock({k: pretrained[k] for k in floats},
                                   [{k: sd[k] for k in floats} for sd in finetuned.values()])
    for key in floats:
        assert torch.equal(ours[key], theirs[key]), key
    # no task changes it: angle 90 degrees, ratio ~0, the pretrained tensor up to the rounding of
    # the reference's average
    torch.testing.assert_close(ours["frozen.weight"], pretrained["frozen.weight"])


def test_model_stock_needs_two_models():
    from harness.core.errors import MethodNotApplicable

    pretrained, finetuned = wider_models(2)
    with pytest.raises(MethodNotApplicable, match="model-stock needs at least 2"):
        get_method("model-stock").merge(pretrained, {"task0": finetuned["task0"]})


def test_bitdelta_serves_the_reference_weights_at_one_bit():
    pretrained, finetuned = wider_models(3)
    result = get_method("bitdelta").merge(pretrained, finetuned)
    for task, model in finetuned.items():
        served = result.weights_for(task)
        for key, value in pretrained.items():
            if not value.is_floating_point():
                continue
            if value.dim() >= 2:                              # matrices and the conv kernel
                expected = reference.binary_diff(value, model[key])
                if key == "frozen.weight":                    # unchanged: nothing stored
                    expected = value
                assert torch.equal(served[key], expected), (task, key)
            else:                                             # stored exactly
                torch.testing.assert_close(served[key], model[key], rtol=0, atol=1e-6)
    binarized = [v for k, v in pretrained.items()
                 if v.is_floating_point() and v.dim() >= 2 and k != "frozen.weight"]
    exact = sum(4 * v.numel() for v in pretrained.values()
                if v.is_floating_point() and v.dim() < 2)
    expected_bytes = sum(-(-v.numel() // 8) + 4 for v in binarized) + exact
    assert result.stored_bytes("task0") == expected_bytes    # 1 bit per entry, one scale each
    assert result.weights_for_unseen()["layer.weight"].equal(pretrained["layer.weight"])


def test_bitdelta_payload_round_trips_through_storage(tmp_path):
    from harness import MergeResult

    pretrained, finetuned = wider_models(2)
    result = get_method("bitdelta").merge(pretrained, finetuned)
    result.save(tmp_path / "r")
    again = MergeResult.load(tmp_path / "r")
    for key, value in result.weights_for("task1").items():
        assert torch.equal(again.weights_for("task1")[key], value)


# ---- DARE-TIES ----------------------------------------------------------------------------
@pytest.mark.parametrize("merge", ["sum", "mean"])
@pytest.mark.parametrize("seed", [0, 3])
def test_dare_ties_is_ties_of_the_dropped_task_vectors(merge, seed):
    """FusionBench's DareTiesMerging: drop and rescale each task vector, then the official TIES
    over the flattened dropped vectors, ``flat_ptm + lam * merged_tv``; the same drop masks."""
    from harness.methods.dare import drop_and_rescale, key_generator
    from tests.methods.test_ties import official_ties

    pretrained, finetuned = wider_models(4)
    floats = [k for k, v in pretrained.items() if v.is_floating_point()]
    dropped = {t: {k: drop_and_rescale(sd[k] - pretrained[k], 0.5, key_generator(seed, t, k))
                   for k in floats} for t, sd in finetuned.items()}
    zeros = {k: torch.zeros_like(pretrained[k]) for k in floats}
    merged_tv = official_ties(zeros, dropped, k=20, merge=merge, lam=0.5)   # 0 + lam * agg
    ours = get_method("dare-ties", merge_function=merge, seed=seed).merge(
        pretrained, finetuned).base
    for key in floats:
        assert torch.equal(ours[key], pretrained[key] + merged_tv[key]), key
    assert torch.equal(ours["position_ids"], pretrained["position_ids"])
    other = get_method("dare-ties", merge_function=merge, seed=seed + 1).merge(
        pretrained, finetuned).base
    assert not torch.equal(other["mlp.weight"], ours["mlp.weight"])


def test_dare_ties_bad_hyperparameters():
    for name, value in (("p", 1.0), ("k", 0), ("lam", -1), ("merge_function", "max")):
        with pytest.raises(HyperparameterError, match=f"dare-ties.*{name}"):
            get_method("dare-ties", **{name: value})


def test_an_svd_that_fails_to_converge_is_taken_in_float64(monkeypatch):
    from harness.methods import isotropic

    real = torch.linalg.svd
    calls = []

    def failing_in_float32(matrix, full_matrices=True):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", failing_in_float32)
    u, s, vh = isotropic.svd(torch.randn(6, 4))
    assert calls == [torch.float32, torch.float64] and u.dtype == torch.float32
    pretrained, finetuned = wider_models(3)
    merged = get_method("iso-cts").merge(pretrained, finetuned).base
    assert torch.isfinite(merged["mlp.weight"]).all()


# ---- DELLA: mergekit's della_magprune and consensus mixing, transcribed --------------------
def mergekit_della_magprune(tensor, density, epsilon, bernoulli):
    """``mergekit/sparsify.py`` ``della_magprune`` with ``rescale_norm=l1`` (float32, CPU);
    ``bernoulli`` stands in for ``torch.bernoulli`` (the same draws as ours)."""
    orig_shape = tensor.shape
    if len(tensor.shape) < 2:
        tensor = tensor.unsqueeze(0)
    magnitudes = tensor.abs()
    sorted_indices = torch.argsort(magnitudes, dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(torch.float32) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = bernoulli(probs).to(torch.float32)
    masked = tensor * mask
    before_scale, after_scale = tensor.abs().sum(), masked.abs().sum()
    if not (before_scale < 1e-7 or after_scale < 1e-7):
        masked = masked * (before_scale / after_scale)
    return masked.to(tensor.dtype).reshape(orig_shape)


def mergekit_della(base, deltas, lambda_):
    """``GeneralizedTaskArithmeticMergeTask.execute`` for ``della`` (weights 1, normalize)."""
    deltas = torch.stack(deltas, dim=0)
    weights = torch.tensor([1.0] * len(deltas), dtype=deltas.dtype)
    while len(deltas.shape) > len(weights.shape):
        weights.unsqueeze_(-1)
    weighted_deltas = deltas * weights
    sign = weighted_deltas.sign().to(base.dtype)
    majority_sign = (weighted_deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    mask = sign == majority_sign
    mixed_delta = (weighted_deltas * mask).sum(dim=0)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed_delta /= divisor
    if lambda_ != 1:
        mixed_delta *= lambda_
    return (base + mixed_delta).to(base.dtype)


@pytest.mark.parametrize("density,epsilon,lam", [(0.5, 0.15, 1.0), (0.7, 0.2, 0.6)])
def test_della_is_mergekits_della_on_the_same_draws(density, epsilon, lam):
    from harness.methods.dare import key_generator

    pretrained, finetuned = wider_models(3)
    ours = get_method("della", density=density, epsilon=epsilon, lam=lam, seed=2).merge(
        pretrained, finetuned).base
    for key, value in pretrained.items():
        if not value.is_floating_point() or value.dim() == 0 or key == "frozen.weight":
            continue                  # mergekit's ranks need a dimension (no 0-d in LLMs)
        deltas = [mergekit_della_magprune(
            sd[key] - value, density, epsilon,
            lambda p, t=t: torch.bernoulli(p, generator=key_generator(2, t, key)))
            for t, sd in finetuned.items()]
        assert torch.equal(ours[key], mergekit_della(value, deltas, lam)), key
    assert torch.isfinite(ours["logit_scale"])          # a row of one: kept with p = density


def test_della_keeps_the_l1_norm_and_refuses_bad_windows():
    from harness.methods.della import magprune

    tau = torch.randn(30, 20, generator=torch.Generator().manual_seed(4))
    pruned = magprune(tau, 0.5, 0.15, torch.Generator().manual_seed(0))
    assert 0.3 < float((pruned != 0).float().mean()) < 0.7
    torch.testing.assert_close(pruned.abs().sum(), tau.abs().sum())
    with pytest.raises(HyperparameterError, match="della.*epsilon"):
        get_method("della", density=0.1, epsilon=0.15)
    with pytest.raises(HyperparameterError, match="della.*density"):
        get_method("della", density=0)

"""RegMean: the regression it solves, FusionBench's arithmetic, what it tells about the data it
saw, and the errors of a merge that sees data without any."""

import pytest
import torch

from harness import HyperparameterError, get_method
from harness.core.data import TaskInputs
from harness.core.errors import MergeInputError
from harness.methods.regmean import reduce_non_diagonal, regmean_weight
from tests.conftest import LinearsOf, make_models, task_inputs


def test_with_alpha_one_each_linear_layer_solves_the_regression():
    """alpha = 1: W minimises sum_t mean_rows ||X_t W^T - X_t W_t^T||^2, so the gradient there is 0."""
    pretrained, finetuned = make_models(n_tasks=3)
    data = task_inputs(finetuned, examples=40, batch_size=16)
    merged = get_method("regmean", reduce_non_diagonal_ratio=1.0).merge(
        pretrained, finetuned, data=data).base
    w = merged["layer.weight"].double()
    gradient = torch.zeros_like(w)
    for task, model in finetuned.items():
        x = torch.cat(data.batches[task])[:, :8].double()
        gradient += (x @ (w - model["layer.weight"].double()).T).T @ x / len(x)
    assert float(gradient.abs().max()) < 1e-4
    mean = torch.stack([m["layer.bias"] for m in finetuned.values()]).mean(dim=0)
    assert torch.equal(merged["layer.bias"], mean)          # not a linear weight: averaged
    assert torch.equal(merged["position_ids"], pretrained["position_ids"])


def test_the_arithmetic_is_fusionbenchs():
    """reduce_non_diagonal_elements and merging_with_regmean_weights, transcribed from
    FusionBench 0.2.33 (fusion_bench/method/regmean/regmean.py), give the same bits."""
    g = torch.Generator().manual_seed(0)
    grams = [(lambda a: a.T @ a / 10)(torch.randn(10, 6, generator=g)) for _ in range(3)]
    weights = [torch.randn(4, 6, generator=g) for _ in range(3)]

    def fb_reduce(regmean_weights, ratio):
        diag_weights = torch.diag(torch.ones(regmean_weights.shape[0]) - ratio)
        non_diag_weights = torch.zeros_like(diag_weights).fill_(ratio)
        return regmean_weights * (diag_weights + non_diag_weights)

    reduced = [fb_reduce(gram, 0.95) for gram in grams]
    products = [torch.matmul(r, w.transpose(0, 1)) for r, w in zip(reduced, weights)]
    expected = torch.matmul(torch.inverse(sum(reduced)), sum(products)).transpose(0, 1)
    assert torch.equal(regmean_weight(grams, weights, 0.95), expected)
    off = reduce_non_diagonal(grams[0], 0.0)
    assert torch.equal(off, torch.diag(torch.diagonal(grams[0])))


def test_grams_are_fusionbenchs_running_means_over_batches():
    from harness.methods.regmean import input_grams

    pretrained, finetuned = make_models(n_tasks=1)
    data = task_inputs(finetuned, examples=13, batch_size=5)    # batches of 5, 5 and 3 rows
    grams = input_grams(LinearsOf(pretrained), data.batches["task0"], {"layer.weight"})
    x = torch.cat(data.batches["task0"])[:, :8]
    assert set(grams) == {"layer"}
    torch.testing.assert_close(grams["layer"], x.T @ x / len(x), rtol=1e-6, atol=1e-7)


def test_the_result_says_what_data_it_saw():
    pretrained, finetuned = make_models(n_tasks=2)
    data = task_inputs(finetuned, examples=12, batch_size=5)
    result = get_method("regmean").merge(pretrained, finetuned, data=data)
    assert result.info["data"] == {"split": "validation", "examples": {"task0": 12, "task1": 12},
                                   "batches": {"task0": 3, "task1": 3}}
    assert "layer" in result.info["regmean_layers"]


def test_without_data_the_error_names_the_method_and_what_it_needs():
    pretrained, finetuned = make_models(n_tasks=2)
    with pytest.raises(MergeInputError, match="regmean needs the Gram matrices"):
        get_method("regmean").merge(pretrained, finetuned)
    empty = TaskInputs("validation", {"task0": [torch.randn(2, 48)]}, LinearsOf)
    with pytest.raises(MergeInputError, match=r"no unlabeled inputs for task\(s\) \['task1'\]"):
        get_method("regmean").merge(pretrained, finetuned, data=empty)


def test_a_suite_without_inputs_is_refused_before_any_work(tmp_path):
    from harness.bench.runner import RunConfig, validate

    config = RunConfig(method="regmean", suite="offline-llm", results_dir=str(tmp_path),
                       cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="regmean.*sees data.*offline-llm.*provides no "
                                         "unlabeled inputs.*gpt2-glue, offline-text, offline-vision, "
                                         "roberta-glue, tiny, vit-b32, vit-l14"):
        validate(config)


@pytest.mark.parametrize("name,value", [("reduce_non_diagonal_ratio", 1.5),
                                        ("reduce_non_diagonal_ratio", -0.1),
                                        ("examples", 0), ("batch_size", 0)])
def test_hyperparameters_out_of_range_are_named(name, value):
    with pytest.raises(HyperparameterError, match=name):
        get_method("regmean", **{name: value})


def test_tiny_hands_out_validation_inputs_never_test(tiny_cache):
    from harness.bench.lookup import get_suite

    suite = get_suite("tiny", cache_dir=tiny_cache)
    tasks = suite.split_tasks("seen")
    data = suite.task_inputs(tasks, examples=40, batch_size=16)
    assert data.split == "validation" and data.examples(tasks[0]) == 40
    assert [len(b) for b in data.batches[tasks[0]]] == [16, 16, 8]
    validation = suite.data(tasks[0], "validation")[0]
    assert torch.equal(torch.cat(data.batches[tasks[0]]), validation[:40])
    result = get_method("regmean").merge(suite.load_pretrained(),
                                         {t: suite.load_finetuned(t) for t in tasks}, data=data)
    assert result.info["regmean_layers"] == ["layers.0.linear1", "layers.0.linear2",
                                             "layers.1.linear1", "layers.1.linear2"]

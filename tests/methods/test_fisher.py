"""Fisher merging: FusionBench's estimate and weighting (transcribed from fusion-bench 0.2.33,
``fusion_bench/method/fisher_merging/``), what it says of the data it saw, and its errors."""

import pytest
import torch

from harness import HyperparameterError, get_method
from harness.core.data import TaskInputs
from harness.core.errors import MergeInputError
from harness.methods.fisher import diagonal_fisher, fisher_weighted_average
from tests.conftest import LinearsOf, ToyTaskModel, make_models, task_inputs


def fb_fisher(model, batches, names):
    """FusionBench's get_fisher_weights loop (clip_fisher_merging.py), logits from ``model``."""
    num_computed_examples, batches_fisher_weights_list = 0, []
    for batch in batches:
        logits = model(batch)
        labels_probabilities = torch.softmax(logits, dim=-1).detach()
        labels_log_probabilities = torch.log_softmax(logits, dim=-1)
        labels_expectations = torch.sqrt(labels_probabilities) * labels_log_probabilities
        sum_labels_expectations = labels_expectations.sum(dim=-1).sum(dim=0)
        model.zero_grad()
        sum_labels_expectations.backward()
        batches_fisher_weights_list.append({
            name: value.grad.detach() ** 2
            for name, value in model.state_dict(keep_vars=True).items() if name in names})
        num_computed_examples += batch.size(0)
    weights = {}
    for batch_fisher_weights in batches_fisher_weights_list:
        for key in batch_fisher_weights:
            if key not in weights:
                weights[key] = batch_fisher_weights[key]
            else:
                weights[key] += batch_fisher_weights[key]
    return {key: value / num_computed_examples for key, value in weights.items()}


def fb_merge(param_dict, fisher_list, scaling, minimal=1e-6):
    """FusionBench's merging_with_fisher_weights (normalize_fisher_weight=True)."""
    norms = {}
    for name in param_dict:
        models_fisher = torch.stack([f[name] for f in fisher_list], dim=0)
        dims = [i for i in range(1, models_fisher.dim())]
        norms[name] = torch.linalg.vector_norm(models_fisher, dim=dims)
    models_fisher_norm = torch.norm(torch.stack(list(norms.values()), dim=1), dim=1)
    merged = {}
    for name, values in param_dict.items():
        param_values = torch.stack(values, dim=0)
        weights = torch.stack([f[name] for f in fisher_list], dim=0) + minimal
        coefficients = scaling.reshape(-1, *[1 for _ in range(param_values.dim() - 1)])
        inverse = 1.0 / (models_fisher_norm + minimal)
        normalized = (inverse / inverse.sum()).reshape(-1, *[1 for _ in range(param_values.dim() - 1)])
        coefficients = coefficients * normalized
        numerator = (coefficients * weights * param_values).sum(dim=0)
        denominator = (coefficients * weights).sum(dim=0)
        merged[name] = numerator / denominator
    return merged


def test_the_estimate_and_the_weighting_are_fusionbenchs():
    pretrained, finetuned = make_models(n_tasks=3)
    data = task_inputs(finetuned, examples=12, batch_size=5)
    keys = ["embed.weight", "frozen.weight", "layer.weight"]         # sorted, as merges take them
    ours = [diagonal_fisher(ToyTaskModel(m), data.batches[t], keys) for t, m in finetuned.items()]
    theirs = [fb_fisher(ToyTaskModel(m), data.batches[t], {f"backbone.{k}" for k in keys})
              for t, m in finetuned.items()]
    for a, b in zip(ours, theirs):
        assert all(torch.equal(a[k], b[f"backbone.{k}"]) for k in keys)
    weights = {k: [m[k] for m in finetuned.values()] for k in keys}
    expected = fb_merge(weights, [{k: f[f"backbone.{k}"] for k in keys} for f in theirs],
                        torch.ones(3) / 3)
    merged = fisher_weighted_average(weights, ours)
    assert all(torch.equal(merged[k], expected[k]) for k in keys)


def test_identical_models_merge_to_themselves_and_the_record_says_what_it_saw():
    pretrained, finetuned = make_models(n_tasks=1)
    same = {"a": finetuned["task0"], "b": finetuned["task0"]}
    data = task_inputs(same)
    result = get_method("fisher").merge(pretrained, same, data=data)
    for key, value in finetuned["task0"].items():
        torch.testing.assert_close(result.base[key], value, rtol=1e-6, atol=1e-7)
    assert result.info["data"]["examples"] == {"a": 12, "b": 12}


def test_the_task_with_more_fisher_weighs_more():
    pretrained, finetuned = make_models(n_tasks=2)
    data = task_inputs(finetuned)
    result = get_method("fisher").merge(pretrained, finetuned, data=data).base
    average = (finetuned["task0"]["layer.weight"] + finetuned["task1"]["layer.weight"]) / 2
    assert not torch.allclose(result["layer.weight"], average)


def test_without_task_models_the_error_names_the_method_and_its_need():
    pretrained, finetuned = make_models(n_tasks=2)
    no_heads = TaskInputs("validation", task_inputs(finetuned).batches, LinearsOf)
    for data in (None, no_heads):
        with pytest.raises(MergeInputError, match="fisher needs each task model's predictions"):
            get_method("fisher").merge(pretrained, finetuned, data=data)


@pytest.mark.parametrize("name,value", [("examples", 0), ("batch_size", 0),
                                        ("minimal_fisher_weight", 0.0)])
def test_hyperparameters_out_of_range_are_named(name, value):
    with pytest.raises(HyperparameterError, match=name):
        get_method("fisher", **{name: value})


def test_tiny_gives_each_task_its_classifier(tiny_cache):
    from harness.bench.lookup import get_suite

    suite = get_suite("tiny", cache_dir=tiny_cache)
    tasks = suite.split_tasks("seen")
    data = suite.task_inputs(tasks, examples=32, batch_size=16)
    model = data.task_model(tasks[0], suite.load_finetuned(tasks[0]))
    assert model(data.batches[tasks[0]][0]).shape == (16, 2)
    result = get_method("fisher").merge(suite.load_pretrained(),
                                        {t: suite.load_finetuned(t) for t in tasks}, data=data)
    assert result.info["data"]["split"] == "validation"

"""AdaMerging, task-wise and layer-wise: Task Arithmetic at its starting coefficients, the
entropy its steps lower, FusionBench's loss, its record and its errors."""

import pytest
import torch

from harness import HyperparameterError, get_method
from harness.core.data import TaskInputs
from harness.core.errors import MergeInputError
from harness.methods.adamerging import entropy_loss
from tests.conftest import LinearsOf, make_models, task_inputs


@pytest.mark.parametrize("name", ["adamerging", "adamerging-layer"])
def test_no_step_is_task_arithmetic_at_init(name):
    pretrained, finetuned = make_models(n_tasks=3)
    ours = get_method(name, steps=0, init=0.3).merge(pretrained, finetuned,
                                                     data=task_inputs(finetuned)).base
    ta = get_method("task-arithmetic", lam=0.3).merge(pretrained, finetuned).base
    for key, value in ta.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6)


def merged_entropy(result, finetuned, data):
    total = 0.0
    with torch.no_grad():
        for task in finetuned:
            model = data.task_model(task, result.base)
            total += float(sum(entropy_loss(model(batch)) for batch in data.batches[task]))
    return total


@pytest.mark.parametrize("name", ["adamerging", "adamerging-layer"])
def test_steps_lower_the_entropy_and_the_record_says_what_was_seen(name):
    pretrained, finetuned = make_models(n_tasks=3)
    data = task_inputs(finetuned, examples=16, batch_size=16)
    start = get_method(name, steps=0).merge(pretrained, finetuned, data=data)
    learned = get_method(name, steps=30, lr=0.05).merge(pretrained, finetuned, data=data)
    assert merged_entropy(learned, finetuned, data) < merged_entropy(start, finetuned, data)
    coefficients = learned.info["coefficients"]
    assert set(coefficients) == set(finetuned)
    if name == "adamerging-layer":
        assert all(len(c) == 6 for c in coefficients.values())     # one per float key
    assert learned.info["data"]["examples"] == dict.fromkeys(finetuned, 16)
    again = get_method(name, steps=30, lr=0.05).merge(pretrained, finetuned, data=data)
    assert all(torch.equal(again.base[k], learned.base[k]) for k in learned.base)


def test_the_loss_is_fusionbenchs_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    probs = torch.softmax(logits, dim=-1)
    expected = -torch.sum(probs * torch.log(probs + 1e-8), dim=-1).mean()
    assert torch.equal(entropy_loss(logits), expected)


def test_it_asks_for_the_test_split_and_errors_name_its_need():
    assert get_method("adamerging").data_request()["split"] == "test"
    pretrained, finetuned = make_models(n_tasks=2)
    no_heads = TaskInputs("test", task_inputs(finetuned).batches, LinearsOf)
    for data in (None, no_heads):
        with pytest.raises(MergeInputError, match="adamerging needs each task's classifier"):
            get_method("adamerging").merge(pretrained, finetuned, data=data)


@pytest.mark.parametrize("name,value", [("steps", -1), ("lr", 0.0), ("examples", 0),
                                        ("batch_size", 0)])
def test_hyperparameters_out_of_range_are_named(name, value):
    with pytest.raises(HyperparameterError, match=name):
        get_method("adamerging-layer", **{name: value})


def test_tiny_serves_test_inputs_on_request(tiny_cache):
    from harness.bench.lookup import get_suite

    suite = get_suite("tiny", cache_dir=tiny_cache)
    tasks = suite.split_tasks("seen")
    data = suite.task_inputs(tasks, examples=32, batch_size=16, split="test")
    assert data.split == "test"
    assert torch.equal(torch.cat(data.batches[tasks[0]]), suite.data(tasks[0], "test")[0][:32])
    result = get_method("adamerging", steps=2).merge(
        suite.load_pretrained(), {t: suite.load_finetuned(t) for t in tasks}, data=data)
    assert result.info["data"]["split"] == "test"


class NormedClassifier(torch.nn.Module):
    """``head(relu(norm(fc(x))))`` whose backbone (``fc``, a ``BatchNorm1d`` with its running
    statistics) is addressed as ``backbone.<key>``, in eval mode as the suites run it."""

    def __init__(self, state):
        super().__init__()
        self.backbone = torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 6),
                                             "norm": torch.nn.BatchNorm1d(6)})
        self.backbone.load_state_dict(state)
        self.head = torch.nn.Linear(6, 3)
        torch.nn.init.constant_(self.head.weight, 0.5)
        self.eval()

    def forward(self, batch):
        hidden = self.backbone["norm"](self.backbone["fc"](batch))
        return self.head(torch.relu(hidden))


def normed_models(n_tasks=2):
    g = torch.Generator().manual_seed(3)
    base = {"fc.weight": torch.randn(6, 4, generator=g), "fc.bias": torch.randn(6, generator=g),
            "norm.weight": torch.ones(6), "norm.bias": torch.zeros(6),
            "norm.running_mean": torch.randn(6, generator=g),
            "norm.running_var": torch.rand(6, generator=g) + 0.5,
            "norm.num_batches_tracked": torch.tensor(100)}
    tasks = {}
    for t in range(n_tasks):     # small changes: every running variance stays positive
        tasks[f"t{t}"] = {k: v + 0.1 * torch.rand(v.shape, generator=g)
                          if v.is_floating_point() else v.clone() for k, v in base.items()}
    return base, tasks


@pytest.mark.parametrize("name", ["adamerging", "adamerging-layer"])
def test_batch_norm_statistics_are_merged_without_a_gradient(name):
    pretrained, finetuned = normed_models()
    g = torch.Generator().manual_seed(5)
    batches = {t: [torch.randn(8, 4, generator=g)] for t in finetuned}
    data = TaskInputs("test", batches, LinearsOf, lambda task, state: NormedClassifier(state))
    result = get_method(name, steps=3, lr=0.05).merge(pretrained, finetuned, data=data)
    coefficients = result.info["coefficients"]
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    lam = {t: dict(zip(keys, c)) if name == "adamerging-layer" else dict.fromkeys(keys, c)
           for t, c in coefficients.items()}
    for task, by_key in lam.items():
        assert by_key["fc.weight"] != pytest.approx(0.3)          # learned
        if name == "adamerging-layer":                             # no gradient reaches them
            assert by_key["norm.running_mean"] == float(torch.tensor(0.3))
    for key in keys:             # every float key, statistics included, is Task Arithmetic's
        expected = pretrained[key] + sum(lam[t][key] * (finetuned[t][key] - pretrained[key])
                                         for t in finetuned)
        torch.testing.assert_close(result.base[key], expected, rtol=0, atol=1e-6)
    assert torch.equal(result.base["norm.num_batches_tracked"],
                       pretrained["norm.num_batches_tracked"])

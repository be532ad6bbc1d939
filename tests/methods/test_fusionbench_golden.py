"""Each method against FusionBench's own code: golden files written by
``scripts/fusionbench_golden.py`` from FusionBench 0.2.33's wheel (pinned by SHA-256), checked in.
Bit for bit: these merges do the same arithmetic in the same order. DARE-TIES is compared on this
harness's drop draws (FusionBench draws from the global random state); RegMean and Fisher merging
on fixed Gram matrices and Fisher weights stored with the inputs; BitDelta on the weights it
serves each task."""

import os

import pytest
import torch
from torch import nn

from harness import get_method
from harness.core.data import TaskInputs
from harness.methods.fisher import fisher_weighted_average
from harness.methods.regmean import regmean_weight
from tests.methods.golden_files import read_golden

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "data", "fusionbench_golden.safetensors")


def golden():
    cases, metadata, pretrained, finetuned, tensors = read_golden(GOLDEN)
    statistics = {kind: {t: {k.split("/", 3)[3]: v for k, v in tensors.items()
                             if k.startswith(f"input/{kind}/{t}/")} for t in finetuned}
                  for kind in ("gram", "fisher")}
    return cases, metadata, pretrained, finetuned, statistics, tensors


CASES, METADATA, PRETRAINED, FINETUNED, STATISTICS, TENSORS = golden()
MERGES = sorted(c for c, spec in CASES.items() if spec["method"] not in (
    "bitdelta", "regmean", "fisher", "adamerging", "adamerging-layer"))


def assert_bit_for_bit(ours, theirs, name):
    assert theirs.shape == ours.shape, name
    assert torch.equal(ours, theirs), (name, float((ours - theirs).abs().max()))


def test_the_golden_file_says_where_it_came_from():
    assert METADATA["wheel"] == "fusion_bench-0.2.33-py3-none-any.whl"
    assert len(METADATA["wheel_sha256"]) == 64 and len(FINETUNED) == 4
    assert {c["method"] for c in CASES.values()} == {
        "iso-c", "iso-cts", "tsv-m", "ties", "dare-ties", "model-stock", "bitdelta", "regmean",
        "fisher", "adamerging", "adamerging-layer"}


@pytest.mark.parametrize("case", MERGES)
def test_bit_for_bit_fusionbenchs_merge(case):
    spec = CASES[case]
    tasks = spec["options"].get("tasks", list(FINETUNED))
    ours = get_method(spec["method"], **spec["hyperparameters"]).merge(
        PRETRAINED, {t: FINETUNED[t] for t in tasks}).base
    for key in PRETRAINED:
        assert_bit_for_bit(ours[key], TENSORS[f"{case}/{key}"], key)


def test_bitdelta_serves_each_task_fusionbenchs_weights():
    result = get_method("bitdelta").merge(PRETRAINED, FINETUNED)
    compared = [name.split("/", 1)[1] for name in TENSORS if name.startswith("bitdelta/")]
    assert len(compared) == len(FINETUNED)          # one 64-input matrix per task
    for name in compared:
        task, key = name.split("/", 1)
        assert_bit_for_bit(result.weights_for(task)[key], TENSORS[f"bitdelta/{name}"], name)


@pytest.mark.parametrize("case", ["regmean", "regmean-conv1d"])
def test_regmean_merges_fusionbenchs_weights_from_the_same_grams(case):
    """``nn.Linear`` weights, ``(out, in)``; and ``(in, out)`` ones as GPT-2's ``Conv1D``
    stores them (FusionBench's ``weight_transpose = false``)."""
    ratio = CASES[case]["options"]["reduce_non_diagonal_ratio"]
    if case == "regmean":          # the default: FusionBench's CLIP setting
        assert get_method("regmean").reduce_non_diagonal_ratio == ratio
    transpose = CASES[case]["options"].get("weight_transpose", True)
    grams = STATISTICS["gram"]
    for key in PRETRAINED:
        weights = [FINETUNED[t][key] for t in FINETUNED]
        module = key.removesuffix(".weight")
        if module in grams["task0"]:
            if not transpose:
                weights = [w.T.contiguous() for w in weights]
            ours = regmean_weight([grams[t][module] for t in FINETUNED], weights, ratio,
                                  transpose=transpose)
        else:                                   # not a linear layer: the average, as there
            ours = torch.stack(weights, dim=0).mean(dim=0)
        assert_bit_for_bit(ours, TENSORS[f"{case}/{key}"], key)
    assert len(grams["task0"]) == 4


def test_fisher_merges_fusionbenchs_weights_from_the_same_fishers():
    fishers = [STATISTICS["fisher"][t] for t in FINETUNED]
    keys = sorted(fishers[0])
    minimal = get_method("fisher").minimal_fisher_weight      # the default
    assert minimal == CASES["fisher"]["options"]["minimal_fisher_weight"]
    merged = fisher_weighted_average({k: [FINETUNED[t][k] for t in FINETUNED] for k in keys},
                                     fishers, minimal=minimal)
    for key in keys:
        assert_bit_for_bit(merged[key], TENSORS[f"fisher/{key}"], key)


class SmallNetwork(nn.Module):
    """The AdaMerging case's backbone, as the golden script builds it."""

    def __init__(self, state_dict):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 6)
        self.load_state_dict(state_dict)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Classifier(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = SmallNetwork(backbone), nn.Linear(6, 3)
        self.head.load_state_dict(head)

    def forward(self, x):
        return self.head(self.backbone(x))


def adamerging_inputs():
    order = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]    # the module's, as there

    def part(prefix):
        found = {k[len(prefix):]: v for k, v in TENSORS.items() if k.startswith(prefix)}
        return {k: found[k] for k in order} if set(found) == set(order) else found
    pretrained = part("input/adamerging/pretrained/")
    finetuned = {t: part(f"input/adamerging/{t}/") for t in FINETUNED}
    heads = {t: part(f"input/adamerging/head/{t}/") for t in FINETUNED}
    batches = {t: [v for _, v in sorted(part(f"input/adamerging/batch/{t}/").items(),
                                        key=lambda item: int(item[0]))] for t in FINETUNED}
    data = TaskInputs("test", batches, backbone=SmallNetwork,
                      task_model=lambda task, weights: Classifier(weights, heads[task]))
    return pretrained, finetuned, data


@pytest.mark.parametrize("case", ["adamerging", "adamerging-layer"])
def test_adamerging_learns_fusionbenchs_coefficients_and_model(case):
    spec = CASES[case]
    pretrained, finetuned, data = adamerging_inputs()
    method = get_method(spec["method"], **spec["hyperparameters"], batch_size=16)
    assert (method.lr, method.init) == (spec["options"]["lr"], spec["options"]["init_values"])
    result = method.merge(pretrained, finetuned, data=data)
    coefficients = result.info["coefficients"]
    ours = torch.tensor([coefficients[t] for t in finetuned])
    theirs = TENSORS[f"{case}/coefficients"]
    assert not torch.equal(theirs, torch.full_like(theirs, 0.3))      # they were learned
    assert_bit_for_bit(ours, theirs, "coefficients")
    for key in pretrained:
        assert_bit_for_bit(result.base[key], TENSORS[f"{case}/{key}"], key)

"""Each method against FusionBench's own code: golden files written by
``scripts/fusionbench_golden.py`` from FusionBench 0.2.33's wheel (pinned by SHA-256), checked in.
Bit for bit: these merges do the same arithmetic in the same order."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from harness import get_method

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "data", "fusionbench_golden.safetensors")


def golden():
    with safe_open(GOLDEN, framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    tasks = json.loads(metadata["tasks"])
    pretrained = {k.split("/", 2)[2]: v for k, v in tensors.items()
                  if k.startswith("input/pretrained/")}
    finetuned = {t: {k.split("/", 2)[2]: v for k, v in tensors.items()
                     if k.startswith(f"input/{t}/")} for t in tasks}
    return json.loads(metadata["cases"]), metadata, pretrained, finetuned, tensors


CASES, METADATA, PRETRAINED, FINETUNED, TENSORS = golden()


def test_the_golden_file_says_where_it_came_from():
    assert METADATA["wheel"] == "fusion_bench-0.2.33-py3-none-any.whl"
    assert len(METADATA["wheel_sha256"]) == 64 and len(FINETUNED) == 4
    assert {c["method"] for c in CASES.values()} == {"iso-c", "iso-cts", "tsv-m", "ties"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_for_bit_fusionbenchs_merge(case):
    spec = CASES[case]
    ours = get_method(spec["method"], **spec["hyperparameters"]).merge(PRETRAINED, FINETUNED).base
    for key in PRETRAINED:
        theirs = TENSORS[f"{case}/{key}"]
        assert theirs.shape == ours[key].shape, key
        assert torch.equal(ours[key], theirs), (key, float((ours[key] - theirs).abs().max()))

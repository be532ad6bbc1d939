"""DELLA and Model Breadcrumbs against mergekit's own code (FusionBench has neither): golden files
written by ``scripts/mergekit_golden.py`` from mergekit 0.1.5's wheel (pinned by SHA-256),
checked in. Bit for bit, on this harness's Bernoulli draws (mergekit draws from the global random
state). Breadcrumbs is the example plugin's method, imported from ``examples/``."""

import os
import sys

import pytest
import torch

from harness import get_method
from tests.methods.golden_files import read_golden

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
GOLDEN = os.path.join(ROOT, "tests", "data", "mergekit_golden.safetensors")


CASES, METADATA, PRETRAINED, FINETUNED, TENSORS = read_golden(GOLDEN)


def method(name, hyperparameters):
    if name == "breadcrumbs":
        sys.path.insert(0, os.path.join(ROOT, "examples", "merge-harness-breadcrumbs"))
        try:
            from merge_harness_breadcrumbs import Breadcrumbs
        finally:
            sys.path.pop(0)
        return Breadcrumbs(**hyperparameters)
    return get_method(name, **hyperparameters)


def test_the_golden_file_says_where_it_came_from():
    assert METADATA["wheel"] == "mergekit-0.1.5-py3-none-any.whl"
    assert len(METADATA["wheel_sha256"]) == 64 and len(FINETUNED) == 4
    assert {c["method"] for c in CASES.values()} == {"della", "breadcrumbs"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_for_bit_mergekits_merge(case):
    spec = CASES[case]
    ours = method(spec["method"], spec["hyperparameters"]).merge(PRETRAINED, FINETUNED).base
    keys = [name.split("/", 1)[1] for name in TENSORS if name.startswith(f"{case}/")]
    assert len(keys) >= len(PRETRAINED) - 1          # DELLA leaves out the 0-d key only
    for key in keys:
        theirs = TENSORS[f"{case}/{key}"]
        assert theirs.shape == ours[key].shape, key
        assert torch.equal(ours[key], theirs), (key, float((ours[key] - theirs).abs().max()))


def test_the_defaults_are_the_ones_compared():
    della = get_method("della")
    options = CASES["della"]["options"]
    assert (della.density, della.epsilon, della.lam) == (options["density"], options["epsilon"],
                                                         options["lambda"])
    crumbs = method("breadcrumbs", {})
    options = CASES["breadcrumbs"]["options"]
    assert (crumbs.density, crumbs.gamma, crumbs.lam) == (options["density"], options["gamma"],
                                                          options["lambda"])

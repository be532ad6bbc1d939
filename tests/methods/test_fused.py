"""The fused Task Arithmetic and Weight Averaging kernels: torch's bits, the same checks and errors, and built
wherever CI runs (elsewhere an install without a compiler takes the torch rule)."""

import os

import pytest
import torch

from harness import get_method
from harness.core import fused
from harness.core.errors import MergeInputError
from tests.conftest import make_models

needs_kernel = pytest.mark.skipif(not fused.available() and not os.environ.get("CI"),
                                  reason="the fused kernels are not built here")


def both_paths(monkeypatch, merge):
    """``merge()`` with the fused kernel and with the torch rule."""
    with_kernel = merge()
    monkeypatch.setenv(fused.DISABLE, "1")
    try:
        without = merge()
    finally:
        monkeypatch.delenv(fused.DISABLE)
    return with_kernel, without


def test_ci_builds_the_kernels():
    if os.environ.get("CI"):
        assert fused.available(), "the optional extension harness.core._fused was not built"


@needs_kernel
@pytest.mark.parametrize("method", ["task-arithmetic", "weight-averaging"])
@pytest.mark.parametrize("n_tasks,lam", [(1, 0.3), (2, 1.0), (5, 0.3), (9, 0.7)])
def test_the_kernel_gives_the_torch_rules_bits(monkeypatch, method, n_tasks, lam):
    g = torch.Generator().manual_seed(n_tasks)
    pretrained = {"big": torch.randn(3000, 700, generator=g),        # many row blocks
                  "vector": torch.randn(33, generator=g), "scalar": torch.tensor(1.5),
                  "half": torch.randn(8, 8, generator=g).to(torch.bfloat16),   # torch rule
                  "ids": torch.arange(4)}
    finetuned = {f"t{t}": {k: (v + torch.randn(v.shape, generator=g).to(v.dtype)
                               if v.is_floating_point() else v.clone())
                           for k, v in pretrained.items()} for t in range(n_tasks)}
    finetuned["t0"]["vector"] = pretrained["vector"].clone()        # one task leaves a key
    calls = []
    kernel = method.replace("-", "_").replace("averaging", "average")
    real = getattr(fused, kernel)
    monkeypatch.setattr(fused, kernel, lambda *a: calls.append(1) or real(*a))
    options = {"lam": lam} if method == "task-arithmetic" else {}
    ours, theirs = both_paths(monkeypatch, lambda: get_method(method, **options).merge(
        pretrained, finetuned))
    assert calls                                    # the kernel ran
    assert all(torch.equal(ours.base[k], theirs.base[k]) for k in pretrained)
    assert ours.merged_params == theirs.merged_params


def test_fits_only_float32_contiguous_cpu_blocks_of_one_size():
    a = torch.zeros(4, 4)
    assert fused.fits(a, a, a)
    assert not fused.fits(a, a.t(), a)                                  # not contiguous
    assert not fused.fits(a, a.to(torch.bfloat16), a)
    assert not fused.fits(a, torch.zeros(15), a)
    assert not fused.fits(a, *[a] * (fused.MAX_TASKS + 2))


@needs_kernel
@pytest.mark.parametrize("method,problem", [
    ("task-arithmetic", "nan"), ("task-arithmetic", "inf-pretrained"),
    ("task-arithmetic", "overflow"), ("task-arithmetic", "no-change"),
    ("weight-averaging", "nan"), ("weight-averaging", "inf-pretrained"),
    ("weight-averaging", "no-change")])
def test_the_errors_are_the_torch_rules(monkeypatch, method, problem):
    pretrained, finetuned = make_models(n_tasks=3)
    task = "task1"
    if problem == "nan":
        finetuned[task]["layer.weight"][3, 5] = float("nan")
    elif problem == "inf-pretrained":
        pretrained["embed.weight"][2, 1] = float("inf")
    elif problem == "overflow":
        pretrained["layer.bias"][0] = -3e38
        finetuned[task]["layer.bias"][0] = 3e38
    else:
        finetuned[task] = {k: v.clone() for k, v in pretrained.items()}
    errors = []
    for disabled in (False, True):
        if disabled:
            monkeypatch.setenv(fused.DISABLE, "1")
        with pytest.raises(MergeInputError) as error:
            get_method(method).merge(pretrained, finetuned)
        errors.append(str(error.value))
    assert errors[0] == errors[1]

"""Golden files from mergekit's own code for the methods FusionBench does not implement (DELLA,
whose authors' implementation is mergekit's, and Model Breadcrumbs): mergekit's merges run on the
fixed inputs of ``scripts/fusionbench_golden.py``, the outputs checked in for
``tests/methods/test_mergekit_golden.py`` to compare this harness's methods with.

Not run by CI (it fetches mergekit's wheel from the package index):

    python scripts/mergekit_golden.py [--wheel mergekit-0.1.5-py3-none-any.whl]

mergekit's package imports pydantic, transformers and its task graph when it is imported, so it is
not installed here: its wheel (pinned by version and SHA-256) is unpacked into a temporary folder;
``mergekit/sparsify.py`` (which imports only torch) is imported unchanged, and from
``merge_methods/generalized_task_arithmetic.py`` the class ``GeneralizedTaskArithmeticMerge``,
``ConsensusMethod`` and ``get_mask`` are compiled from their source unchanged, with ``object``
standing in for the base class ``GroupMergeMethod``. Each case calls ``merge_group`` key by key
as mergekit's executor does, with the registry's settings: ``della`` (sign consensus ``sum``,
``della_magprune``, normalized, L1 rescaling) and ``breadcrumbs`` (no consensus,
``magnitude_outliers``, not normalized, no rescaling).

Two changes make the comparison bit for bit: ``torch.bernoulli`` in ``sparsify.py`` draws from
this harness's generator for that task and key (mergekit draws from the global random state), and
Breadcrumbs' ``lam`` is given as mergekit's ``lambda`` with every task weight 1 (mergekit's
``sum_t (w * masked_t)`` and this harness's ``lam * sum_t masked_t`` are the same merge, rounded
differently). The 0-d key is left out of DELLA's case: ``della_magprune`` ranks along a second
dimension that a 0-d tensor does not have.

Writes ``tests/data/mergekit_golden.safetensors``: the inputs and each case's merged tensors
(``<case>/<key>``), with the cases, the wheel's name and SHA-256 and the torch version in its
metadata.
"""

from __future__ import annotations

import argparse
import enum
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
import typing

import torch
from fusionbench_golden import (
    input_tensors,
    inputs,
    load_definitions,
    unpack_wheel,
    write_golden,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "0.1.5"
WHEEL = f"mergekit-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "776a1a1dd0673fad16a8ccfee6880c511c54c94ca30038a8adf29c3ae7af2fc2"
OUTPUT = os.path.join(ROOT, "tests", "data", "mergekit_golden.safetensors")

# case -> (this harness's method and hyperparameters, mergekit's method and parameters)
CASES = {
    "della": ("della", {}, "della",
              {"density": 0.5, "epsilon": 0.15, "weight": 1.0, "lambda": 1.0, "seed": 0}),
    "della-tuned": ("della", {"density": 0.6, "epsilon": 0.2, "lam": 0.8, "seed": 3}, "della",
                    {"density": 0.6, "epsilon": 0.2, "weight": 1.0, "lambda": 0.8, "seed": 3}),
    "breadcrumbs": ("breadcrumbs", {}, "breadcrumbs",
                    {"density": 0.9, "gamma": 0.01, "weight": 1.0, "lambda": 0.3}),
    "breadcrumbs-tuned": ("breadcrumbs", {"density": 0.5, "gamma": 0.05, "lam": 0.7},
                          "breadcrumbs",
                          {"density": 0.5, "gamma": 0.05, "weight": 1.0, "lambda": 0.7}),
}
REGISTRY = {   # mergekit/merge_methods/registry.py
    "della": {"consensus_method": "sum", "sparsification_method": "della_magprune",
              "default_normalize": True, "default_rescale": True},
    "breadcrumbs": {"consensus_method": None, "sparsification_method": "magnitude_outliers",
                    "default_normalize": False, "default_rescale": False},
}


def fetch_wheel(folder: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    f"mergekit=={VERSION}", "-d", folder], check=True)
    return os.path.join(folder, WHEEL)


def load_mergekit(wheel: str, folder: str) -> dict:
    unpack_wheel(wheel, WHEEL_SHA256, folder)
    package = os.path.join(folder, "mergekit")
    sys.modules["mergekit"] = types.ModuleType("mergekit")
    sys.modules["mergekit"].__path__ = [package]
    spec = importlib.util.spec_from_file_location("mergekit.sparsify",
                                                  os.path.join(package, "sparsify.py"))
    sparsify = importlib.util.module_from_spec(spec)
    sys.modules["mergekit.sparsify"] = sparsify
    spec.loader.exec_module(sparsify)
    namespace = {"torch": torch, "Enum": enum.Enum, "Any": typing.Any,
                 "Optional": typing.Optional, "Literal": typing.Literal,
                 "cached_property": functools.cached_property,
                 "dataclass": __import__("dataclasses").dataclass,
                 "GroupMergeMethod": object, "MergeMethodSpec": object, "TensorGroup": object,
                 "RescaleNorm": sparsify.RescaleNorm,
                 "SparsificationMethod": sparsify.SparsificationMethod,
                 "sparsify": sparsify.sparsify}
    load_definitions(os.path.join(package, "merge_methods", "generalized_task_arithmetic.py"),
                     ["ConsensusMethod", "GeneralizedTaskArithmeticMerge", "get_mask"],
                     namespace)
    return {"sparsify_module": sparsify, **namespace}


class _HarnessDraws:
    """``torch`` for ``sparsify.py``, except that ``bernoulli`` draws from this harness's
    generators: ``generators`` holds one key's, task by task, in the order ``merge_group``
    prunes that key's task vectors (one draw each)."""

    def __init__(self) -> None:
        self.generators = iter(())

    def bernoulli(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(probs, generator=next(self.generators))

    def __getattr__(self, name: str):
        return getattr(torch, name)


class _Entry(types.SimpleNamespace):
    """A ``TensorGroup`` entry: ``tensor`` and ``id``."""


def run_case(mk: dict, merge: str, options: dict, pretrained: dict, finetuned: dict) -> dict:
    from harness.methods.dare import key_generator

    settings = REGISTRY[merge]
    method = mk["GeneralizedTaskArithmeticMerge"](
        consensus_method=settings["consensus_method"] and mk["ConsensusMethod"](
            settings["consensus_method"]),
        sparsification_method=mk["SparsificationMethod"](settings["sparsification_method"]),
        default_normalize=settings["default_normalize"],
        default_rescale=settings["default_rescale"], method_name=merge,
        method_pretty_name=None, method_reference_url=None)
    tasks = list(finetuned)
    parameters = {"int8_mask": False, "normalize": settings["default_normalize"],
                  "rescale": settings["default_rescale"], "lambda": options["lambda"],
                  **{name: dict.fromkeys(tasks, options[name])
                     for name in ("weight", "density", "gamma", "epsilon") if name in options}}
    draws = _HarnessDraws()
    mk["sparsify_module"].torch = draws
    merged = {}
    try:
        for key, base in pretrained.items():
            if merge == "della" and base.dim() == 0:
                continue
            entries = [_Entry(tensor=finetuned[task][key], id=task) for task in tasks]
            group = types.SimpleNamespace(base=types.SimpleNamespace(tensor=base),
                                          non_base=entries)
            draws.generators = iter([key_generator(options.get("seed", 0), t, key)
                                     for t in tasks])
            merged[key] = method.merge_group(group, **parameters)
    finally:
        mk["sparsify_module"].torch = torch
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help=f"{WHEEL} already downloaded (default: pip download)")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    pretrained, finetuned = inputs()
    tensors = input_tensors(pretrained, finetuned)
    with tempfile.TemporaryDirectory(prefix="mergekit-") as folder:
        mk = load_mergekit(args.wheel or fetch_wheel(folder), os.path.join(folder, "wheel"))
        for case, (_, _, merge, options) in CASES.items():
            merged = run_case(mk, merge, options, pretrained, finetuned)
            tensors.update({f"{case}/{k}": v.contiguous() for k, v in merged.items()})
            print(f"{case}: {len(merged)} tensors")
    write_golden(args.output, tensors, CASES, "mergekit", list(finetuned), WHEEL, WHEEL_SHA256)


if __name__ == "__main__":
    main()

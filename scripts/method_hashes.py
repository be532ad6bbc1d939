"""Pin every method's outputs: merge fixed synthetic inputs with each method and hyperparameter
family, and print (or check) the sha256 of every output tensor.

    python scripts/method_hashes.py                      # print the hashes as JSON
    python scripts/method_hashes.py --write FILE         # store them
    python scripts/method_hashes.py --check FILE         # exit 1 naming every case that moved

What is hashed, per case: the merged base (every tensor), the shared tensors (EMR's tau_uni,
TALL's tau_MTL), each task's stored payload (every codec's tensors and metadata, the task scale),
the accounting facts (merged parameters, paper bits, info), the weights served to every seen task
and to an unseen one, and the tensors read back from a saved result. Cases cover TIES sum/mean,
DTS lapack/canonical signs, matrix/vector grouping and its SVD solvers, blocked (out-of-core)
SVDs, starred budgets in both counts, DARE seeds, per-task TALL lambdas, the subspace merges
(Iso-C, Iso-CTS, TSV-M), Model Stock, BitDelta, DARE-TIES, DELLA, RegMean, Fisher and
AdaMerging (on fixed stand-in inputs), and in-memory and streamed outputs.

A refactor must leave every hash unchanged (``tests/methods/test_output_hashes.py`` runs this
check). The computation runs in a child process with one thread, ATen's portable kernels and
MKL's compatible code path, so the bits do not depend on the machine's CPU features or cores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1", "MERGE_HARNESS_HASH_CHILD": "1"}

TASKS = ("alpha", "beta", "gamma")

# (case name, method, hyperparameters, options): options "stream" writes model-sized outputs as
# shards; "blocked" decomposes every matrix over 64 KiB block by block (the out-of-core SVD)
CASES = [
    ("weight-averaging", "weight-averaging", {}, ()),
    ("task-arithmetic", "task-arithmetic", {}, ()),
    ("task-arithmetic-lam", "task-arithmetic", {"lam": 0.7}, ()),
    ("task-arithmetic-streamed", "task-arithmetic", {}, ("stream",)),
    ("ties-sum", "ties", {}, ()),
    ("ties-mean", "ties", {"merge_function": "mean"}, ()),
    ("ties-k5", "ties", {"k": 5.0, "lam": 1.0}, ()),
    ("ties-k100", "ties", {"k": 100.0}, ()),
    ("ties-streamed", "ties", {}, ("stream",)),
    ("dare", "dare", {}, ()),
    ("dare-seed1", "dare", {"seed": 1, "p": 0.9}, ()),
    ("emr", "emr", {}, ()),
    ("emr-streamed", "emr", {}, ("stream",)),
    ("tall-mask", "tall-mask", {}, ()),
    ("tall-mask-per-task", "tall-mask", {"lam": {"alpha": 0.2, "beta": 0.6, "gamma": 0.4}}, ()),
    ("tall-mask-streamed", "tall-mask", {}, ("stream",)),
    ("t-switch", "t-switch", {}, ()),
    ("t-switch-k7", "t-switch", {"k": 0.7}, ()),
    ("svd-matched", "svd", {}, ()),
    ("svd-density", "svd", {"density": 0.1}, ()),
    ("svd-blocked", "svd", {"density": 0.2}, ("blocked",)),
    ("dts-t", "dts-t", {}, ()),
    ("dts-t-lapack", "dts-t", {"svd_signs": "lapack"}, ()),
    ("dts-t-vector", "dts-t", {"grouping": "vector"}, ()),
    ("dts-t-blocked", "dts-t", {}, ("blocked",)),
    ("dts-d", "dts-d", {}, ()),
    ("dts-d-mean", "dts-d", {"ties_merge_function": "mean"}, ()),
    ("dts-d-lapack", "dts-d", {"svd_signs": "lapack"}, ()),
    ("dts-d-streamed", "dts-d", {}, ("stream",)),
    ("dts-t-star", "dts-t-star", {"budget": 20.0}, ()),
    ("dts-t-star-paper", "dts-t-star", {"budget": 20.0, "budget_count": "paper"}, ()),
    ("dts-t-star-1pct", "dts-t-star", {}, ()),
    ("dts-d-star", "dts-d-star", {"budget": 20.0}, ()),
    ("dts-d-star-paper", "dts-d-star", {"budget": 15.0, "budget_count": "paper"}, ()),
    ("dts-d-gram", "dts-d", {"svd_solver": "gram"}, ()),
    ("dts-d-randomized", "dts-d", {"svd_solver": "randomized"}, ()),
    ("dts-t-star-randomized", "dts-t-star", {"budget": 20.0, "svd_solver": "randomized"}, ()),
    ("svd-randomized", "svd", {"density": 0.1, "svd_solver": "randomized"}, ()),
    ("iso-c", "iso-c", {}, ()),
    ("iso-cts", "iso-cts", {}, ()),
    ("tsv-m", "tsv-m", {}, ()),
    ("model-stock", "model-stock", {}, ()),
    ("bitdelta", "bitdelta", {}, ()),
    ("dare-ties", "dare-ties", {}, ()),
    ("della", "della", {}, ()),
    ("regmean", "regmean", {}, ("data",)),
    ("fisher", "fisher", {}, ("data",)),
    ("adamerging", "adamerging", {"steps": 4, "lr": 0.01}, ("data",)),
    ("adamerging-layer", "adamerging-layer", {"steps": 4, "lr": 0.01}, ("data",)),
]


def build_inputs():
    """A pretrained model with every kind of tensor (matrices float32 and bfloat16, one large
    enough for two row blocks, 1-D, 0-d, 4-D, an integer buffer, a key no task changes) and
    three task models: dense and sparse changes, a key one task leaves alone, exact zeros."""
    import numpy
    import torch

    rng = numpy.random.default_rng(20261203)     # numpy's draws do not depend on CPU features

    def normal(shape):
        return torch.from_numpy(rng.standard_normal(shape, dtype=numpy.float32))
    shapes = {"embed.weight": ((96, 40), torch.float32),
              "layers.0.attn.weight": ((64, 64), torch.float32),
              "layers.0.attn.bias": ((64,), torch.float32),
              "layers.0.mlp.weight": ((1024, 704), torch.float32),
              "layers.0.norm.weight": ((64,), torch.bfloat16),
              "layers.0.conv.weight": ((8, 4, 3, 3), torch.float32),
              "layers.1.proj.weight": ((48, 32), torch.bfloat16),
              "frozen.weight": ((16, 16), torch.float32),
              "scale": ((), torch.float32)}
    pretrained = {k: normal(shape).to(dtype) for k, (shape, dtype) in shapes.items()}
    pretrained["position_ids"] = torch.arange(16).reshape(1, 16)
    finetuned = {}
    for index, task in enumerate(TASKS):
        model = {}
        for key, value in pretrained.items():
            if not value.is_floating_point() or key == "frozen.weight":
                model[key] = value.clone()
                continue
            change = normal(value.shape) * 0.02 * (index + 1)
            if key in ("layers.0.conv.weight", "layers.1.proj.weight"):     # sparse changes
                change *= torch.from_numpy(rng.random(value.shape) < 0.3)
            if key == "layers.0.attn.bias" and task == "gamma":          # one task leaves it
                change.zero_()
            model[key] = (value.float() + change).to(value.dtype)
        finetuned[task] = model
    return pretrained, finetuned


def _digest(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        header = f"{value.dtype}{tuple(value.shape)}".encode()
        data = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
        return hashlib.sha256(header + data).hexdigest()
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _module_attr(candidates: tuple[str, ...], name: str):
    """(module, attribute value) of the first importable module among ``candidates`` that has
    ``name``: the hashes must survive code moving between modules."""
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return module, getattr(module, name)
    raise ImportError(f"none of {candidates} defines {name}")


@contextlib.contextmanager
def _options(options: tuple[str, ...], folder: str):
    import harness

    with contextlib.ExitStack() as stack:
        if "stream" in options:
            stack.enter_context(harness.stream_outputs(os.path.join(folder, "stream")))
        if "blocked" in options:
            module, previous = _module_attr(("harness.methods.dts", "methods.dts"),
                                            "IN_MEMORY_SVD_BYTES")
            module.IN_MEMORY_SVD_BYTES = 2**16
            stack.callback(setattr, module, "IN_MEMORY_SVD_BYTES", previous)
        yield


def stand_in_modules():
    """``(Backbone, TaskModel)``: stand-ins for a suite's modules, built from any state dict, for
    merges that see data (here and in the tests). ``Backbone(state)`` holds one ``nn.Linear``
    per 2-D float ``.weight`` key, at that key's module path, each called on the first
    ``in_features`` columns of a batch; ``TaskModel(state)`` holds every float tensor as a
    parameter under ``backbone`` and gives one logit per such matrix, the row sums of
    ``batch[:, :in] @ W^T`` (reading the weights by name, so ``torch.func.functional_call``
    reaches them)."""
    import torch
    from torch import nn

    def matrices(state):
        return [(key, value) for key, value in sorted(state.items())
                if key.endswith(".weight") and value.dim() == 2 and value.is_floating_point()]

    def submodule(root, path):
        for part in path:
            if not hasattr(root, part):
                root.add_module(part, nn.Module())
            root = getattr(root, part)
        return root

    class Backbone(nn.Module):
        def __init__(self, state):
            super().__init__()
            self.order = []
            for key, value in matrices(state):
                *path, module, _ = key.split(".")
                linear = nn.Linear(value.shape[1], value.shape[0], bias=False)
                linear.weight.data.copy_(value.float())
                submodule(self, path).add_module(module, linear)
                self.order.append(linear)

        def forward(self, batch):
            return torch.stack([linear(batch[:, :linear.in_features]).sum(dim=1)
                                for linear in self.order], dim=1)

    class TaskModel(nn.Module):
        def __init__(self, state):
            super().__init__()
            self.backbone = nn.Module()
            for key, value in sorted(state.items()):
                if value.is_floating_point():
                    *path, leaf = key.split(".")
                    submodule(self.backbone, path).register_parameter(
                        leaf, nn.Parameter(value.float().clone()))
            self.keys = [key for key, _ in matrices(dict(self.backbone.named_parameters()))]

        def forward(self, batch):
            weights = [self.backbone.get_submodule(key.rpartition(".")[0]).weight
                       for key in self.keys]
            return torch.stack([(batch[:, :w.shape[1]] @ w.T).sum(dim=1) for w in weights],
                               dim=1)

    return Backbone, TaskModel


def stand_in_inputs(finetuned):
    """Unlabeled inputs for merges that see data ("data" option): fixed numpy draws per task,
    over :func:`stand_in_modules`."""
    import numpy
    import torch

    from harness.core.data import TaskInputs

    backbone, task_model = stand_in_modules()
    width = max(v.shape[1] for m in finetuned.values() for k, v in m.items()
                if k.endswith(".weight") and v.dim() == 2 and v.is_floating_point())
    rng = numpy.random.default_rng(7)
    batches = {task: list(torch.from_numpy(rng.standard_normal((20, width), dtype=numpy.float32))
                          .split(8)) for task in finetuned}
    return TaskInputs("validation", batches, backbone, lambda task, state: task_model(state))


def case_hashes(method_name: str, hyperparameters: dict, options: tuple[str, ...],
                pretrained, finetuned) -> dict[str, str]:
    """Every hash of one case (or its refusal, when the method is not applicable)."""
    import warnings

    import harness
    from safetensors.torch import load_file

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder, _options(options, folder), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = harness.get_method(method_name, **hyperparameters)
        data = {"data": stand_in_inputs(finetuned)} if "data" in options else {}
        try:
            result = method.merge(pretrained, finetuned, **data)
        except harness.MethodNotApplicable as refusal:
            return {"not-applicable": _digest(str(refusal))}
        for key in result.base.keys():
            out[f"base/{key}"] = _digest(result.base[key])
        for name, shared in sorted(result.shared.items()):
            for key in shared.keys():
                out[f"shared/{name}/{key}"] = _digest(shared[key])
        for task, payload in sorted(result.payloads.items()):
            for key, codec in payload.records.items():
                for field, tensor in codec.tensors().items():
                    out[f"payload/{task}/{key}/{field}"] = _digest(tensor)
                out[f"payload/{task}/{key}/meta"] = _digest([codec.kind, codec.meta()])
            if payload.scale is not None:
                out[f"payload/{task}/scale"] = _digest(payload.scale)
        extras = getattr(result, "paper_bits", None)
        out["facts"] = _digest({"kind": result.kind, "tasks": result.tasks,
                                "merged_params": result.merged_params,
                                "stored_bytes": {t: result.stored_bytes(t) for t in result.tasks},
                                "paper_bits": extras, "unseen": result.unseen,
                                "info": result.info})
        for task in result.tasks:
            served = result.weights_for(task)
            out[f"served/{task}"] = _digest([_digest(served[k]) for k in sorted(served)])
        if not result.unseen.get("weighted"):
            served = result.weights_for_unseen()
        else:
            served = result.weights_for_unseen({"alpha": 0.5, "beta": 0.3, "gamma": 0.2})
        out["served/unseen"] = _digest([_digest(served[k]) for k in sorted(served)])
        stored = os.path.join(folder, "saved")
        result.save(stored)
        for name in sorted(os.listdir(stored)):
            if name.endswith(".safetensors"):
                tensors = load_file(os.path.join(stored, name))
                out[f"stored/{name}"] = _digest([[k, _digest(tensors[k])]
                                                 for k in sorted(tensors)])
    return out


def compute() -> dict[str, dict[str, str]]:
    pretrained, finetuned = build_inputs()
    return {name: case_hashes(method, hps, options, pretrained, finetuned)
            for name, method, hps, options in CASES}


def compute_pinned() -> dict[str, dict[str, str]]:
    """:func:`compute` in a child process under :data:`PINNED_ENV`."""
    if os.environ.get("MERGE_HARNESS_HASH_CHILD"):
        return compute()
    child = subprocess.run([sys.executable, os.path.abspath(__file__)],
                           env={**os.environ, **PINNED_ENV}, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"the hashing process failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout)


def differences(expected: dict, actual: dict) -> list[str]:
    """One line per case whose hashes differ from ``expected``."""
    lines = []
    for case in sorted(set(expected) | set(actual)):
        old, new = expected.get(case), actual.get(case)
        if old == new:
            continue
        if old is None or new is None:
            lines.append(f"{case}: {'new case' if old is None else 'case missing'}")
            continue
        moved = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        lines.append(f"{case}: {len(moved)} hash(es) differ: {', '.join(moved[:6])}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="store the hashes in FILE")
    parser.add_argument("--check", metavar="FILE", help="compare with the hashes in FILE")
    args = parser.parse_args()
    hashes = compute_pinned()
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            json.dump(hashes, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {sum(map(len, hashes.values()))} hashes of {len(hashes)} cases to "
              f"{args.write}", file=sys.stderr)
    if args.check:
        with open(args.check, encoding="utf-8") as f:
            moved = differences(json.load(f), hashes)
        for line in moved:
            print(line, file=sys.stderr)
        print(f"{'FAILED' if moved else 'ok'}: {len(hashes)} cases", file=sys.stderr)
        return 1 if moved else 0
    if not (args.write or args.check):
        json.dump(hashes, sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

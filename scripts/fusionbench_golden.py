"""Golden files from FusionBench's own code: its merges run on small fixed inputs, the outputs
checked in for ``tests/methods/test_fusionbench_golden.py`` to compare this harness's methods with.

Not run by CI (it fetches FusionBench's wheel from the package index):

    python scripts/fusionbench_golden.py [--wheel fusion_bench-0.2.33-py3-none-any.whl]

FusionBench's package imports hydra, lightning, peft and a torch of its own choosing when it is
imported, so it is not installed here: its wheel (pinned by version and SHA-256) is unpacked
into a temporary folder and the files that hold the merge arithmetic are imported from it
unchanged (``method/isotropic_merging/iso_utils.py``, ``method/task_singular_vector/utils/
TSVM_utils.py``, ``method/ties_merging/ties_merging_utils.py``, ``utils/state_dict_arithmetic.py``
and the small modules they import). Only the two package ``__init__`` files are bypassed: empty
package modules stand in for ``fusion_bench`` and ``fusion_bench.utils``, with the real
``timeit_context`` attached. Each case is then run the way FusionBench's algorithm class runs it
(``state_dict_sub``, the merge, ``state_dict_add(pretrained, state_dict_mul(merged, alpha))``,
or for TIES its flatten, ``ties_merging`` and ``flat_ptm + scaling_factor * merged``).

Writes ``tests/data/fusionbench_golden.safetensors``: the inputs (``input/pretrained/<key>``,
``input/<task>/<key>``) and each case's merged tensors (``<case>/<key>``), with the cases, the
wheel's name and SHA-256 and the torch version in its metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile

import torch

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
}


def inputs(n_tasks: int = 4) -> tuple[dict, dict]:
    """Small fixed models: matrices with several directions per task, a bias, a 4-D kernel and
    a scalar (the kinds FusionBench treats apart), float32."""
    g = torch.Generator().manual_seed(20261203)
    shapes = {"embed.weight": (20, 8), "mlp.weight": (48, 24), "proj.weight": (16, 40),
              "layer.bias": (8,), "conv.weight": (4, 2, 3, 3), "logit_scale": ()}
    pretrained = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    finetuned = {f"task{t}": {k: v + 0.05 * torch.randn(v.shape, generator=g)
                              for k, v in pretrained.items()} for t in range(n_tasks)}
    return pretrained, finetuned


def fetch_wheel(folder: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    f"fusion-bench=={VERSION}", "-d", folder], check=True)
    return os.path.join(folder, WHEEL)


def load_fusionbench(wheel: str, folder: str) -> dict[str, types.ModuleType]:
    """FusionBench's arithmetic modules, imported from its unpacked wheel."""
    with open(wheel, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {digest}, expected {WHEEL_SHA256} (fusion-bench "
                         f"{VERSION})")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    package = os.path.join(folder, "fusion_bench")
    for name, path in (("fusion_bench", package), ("fusion_bench.utils",
                                                   os.path.join(package, "utils"))):
        module = types.ModuleType(name)
        module.__path__ = [path]            # submodules import from the real files
        sys.modules[name] = module

    def load(name: str, relative: str) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, os.path.join(package, relative))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    timer = load("fusion_bench.utils.timer", "utils/timer.py")
    sys.modules["fusion_bench.utils"].timeit_context = timer.timeit_context
    load("fusion_bench.utils.type", "utils/type.py")
    return {
        "arithmetic": load("fusion_bench.utils.state_dict_arithmetic",
                           "utils/state_dict_arithmetic.py"),
        "iso": load("fusion_bench.method.isotropic_merging.iso_utils",
                    "method/isotropic_merging/iso_utils.py"),
        "tsv": load("fusion_bench.method.task_singular_vector.utils.TSVM_utils",
                    "method/task_singular_vector/utils/TSVM_utils.py"),
        "ties": load("fusion_bench.method.ties_merging.ties_merging_utils",
                     "method/ties_merging/ties_merging_utils.py"),
    }


def run_case(fb: dict, merge: str, options: dict, pretrained: dict, finetuned: dict) -> dict:
    arithmetic = fb["arithmetic"]
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
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help=f"{WHEEL} already downloaded (default: pip download)")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    pretrained, finetuned = inputs()
    tensors = {f"input/pretrained/{k}": v for k, v in pretrained.items()}
    for task, model in finetuned.items():
        tensors.update({f"input/{task}/{k}": v for k, v in model.items()})
    with tempfile.TemporaryDirectory(prefix="fusionbench-") as folder:
        fb = load_fusionbench(args.wheel or fetch_wheel(folder), os.path.join(folder, "wheel"))
        for case, (_, _, merge, options) in CASES.items():
            merged = run_case(fb, merge, options, pretrained, finetuned)
            tensors.update({f"{case}/{k}": v.contiguous() for k, v in merged.items()})
            print(f"{case}: {len(merged)} tensors")
    metadata = {"cases": json.dumps({case: {"method": method, "hyperparameters": hps,
                                            "fusionbench": merge, "options": options}
                                     for case, (method, hps, merge, options) in CASES.items()}),
                "tasks": json.dumps(list(finetuned)), "wheel": WHEEL,
                "wheel_sha256": WHEEL_SHA256, "torch": torch.__version__}
    partial = args.output + ".partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

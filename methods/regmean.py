"""RegMean (Jin et al., ICLR 2023, "Dataless knowledge fusion by merging weights of language
models"), as FusionBench runs it (``fusion_bench/method/regmean/regmean.py``): each linear
layer's merged weight solves the regression that matches every task model's outputs on that
task's inputs, ``W = (sum_t G_t)^-1 sum_t G_t W_t`` in the input-major layout, where ``G_t`` is
the Gram matrix of the layer's inputs under task ``t``'s own model; every other parameter is the
average of the task models.

- It sees data: a bounded number of unlabeled examples of each task's validation split, from the
  suite (:class:`harness.core.data.TaskInputs`); the record says how many.
- ``G_t`` is accumulated as FusionBench's hook does: the running mean of ``x^T x`` over rows of
  every batch's flattened inputs (``(n * G + x^T x) / (n + rows)``), then its off-diagonal
  entries are multiplied by ``reduce_non_diagonal_ratio`` (the paper's alpha).
- [decision] alpha = 0.95, FusionBench's CLIP setting (the configuration the DTS paper's RegMean
  rows come from); the paper tunes it on validation data. 256 examples per task in batches of
  32, FusionBench's defaults.
- [decision] A linear layer takes RegMean when its module is called through ``forward`` (so a
  hook sees its inputs) for every task; a weight used inside a fused kernel (PyTorch's
  ``nn.MultiheadAttention`` input projection) is averaged, as FusionBench averages every
  parameter that is not a hooked ``nn.Linear``'s weight.
- GPT-2's projections are transformers' ``Conv1D`` (``y = x W + b``, ``W`` stored
  ``(in, out)``): they take RegMean too, without the transposes (FusionBench's
  ``gpt2_regmean.py``: ``Conv1D`` modules, ``weight_transpose = false``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.core.tensors import to_float32
from harness.engine.method import hp, require
from harness.engine.result import MergeResult
from harness.engine.templates import DataMerge


def input_grams(module: nn.Module, batches: Sequence, weight_keys: set[str]) -> dict[str, Tensor]:
    """The Gram matrix of the inputs of every ``nn.Linear`` of ``module`` whose weight key is in
    ``weight_keys`` and which ``forward`` calls, over ``batches``, as FusionBench's hook
    accumulates it (float32, module name -> ``(in, in)``)."""
    grams: dict[str, Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def accumulate(_module, inputs, _output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            xtx = torch.matmul(x.transpose(0, 1), x)
            if name not in grams:
                grams[name], rows[name] = xtx / x.shape[0], x.shape[0]
            else:
                grams[name] = (grams[name] * rows[name] + xtx) / (rows[name] + x.shape[0])
                rows[name] += x.shape[0]
        return accumulate

    handles = [m.register_forward_hook(hook(name))
               for name, m in linear_modules(module, weight_keys).items()]
    try:
        with torch.no_grad():
            for batch in batches:
                module(batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def is_input_major(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): a linear map whose weight is
    stored ``(in, out)``. Named, not imported: this layer does not import transformers."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def linear_modules(module: nn.Module, weight_keys: set[str]) -> dict[str, nn.Module]:
    """``module``'s ``nn.Linear`` and ``Conv1D`` submodules whose weight key is in
    ``weight_keys``, by name."""
    return {name: m for name, m in module.named_modules()
            if (isinstance(m, nn.Linear) or is_input_major(m)) and f"{name}.weight" in weight_keys}


def reduce_non_diagonal(gram: Tensor, ratio: float) -> Tensor:
    """``gram`` with its off-diagonal entries multiplied by ``ratio`` (FusionBench's
    ``reduce_non_diagonal_elements``, the same operations)."""
    diagonal = torch.diag(torch.ones(gram.shape[0]) - ratio).to(gram.device)
    off_diagonal = torch.zeros_like(diagonal).fill_(ratio)
    return gram * (diagonal + off_diagonal)


def regmean_weight(grams: Sequence[Tensor], weights: Sequence[Tensor], ratio: float, *,
                   transpose: bool = True) -> Tensor:
    """One linear layer's merged weight from each task's input Gram matrix and weight (float32),
    operation for operation as FusionBench: ``(out, in)`` weights (``nn.Linear``) are transposed
    in and out; ``transpose=False`` for ``(in, out)`` ones (``Conv1D``)."""
    reduced = [reduce_non_diagonal(gram, ratio) for gram in grams]
    products = [torch.matmul(gram, weight.transpose(0, 1) if transpose else weight)
                for gram, weight in zip(reduced, weights)]
    merged = torch.matmul(torch.inverse(sum(reduced)), sum(products))
    return merged.transpose(0, 1) if transpose else merged


@dataclass(frozen=True)
class RegMean(DataMerge):
    """RegMean: closed-form regression merge of linear layers from their inputs' Gram matrices;
    the other parameters averaged. Sees unlabeled examples of each task."""

    name = "regmean"
    display_name = "RegMean"
    family = "data-dependent"
    year = 2023
    needs_data = "the Gram matrices of each linear layer's inputs, from unlabeled task examples"
    reduce_non_diagonal_ratio: float = hp(0.95, "alpha: factor of the Gram matrices' "
                                                "off-diagonal entries")
    examples: int = hp(256, "unlabeled examples per task (validation split)")
    batch_size: int = hp(32, "examples per forward pass")

    def check(self):
        require(0 <= self.reduce_non_diagonal_ratio <= 1, self.name, "reduce_non_diagonal_ratio",
                f"must be in [0, 1], got {self.reduce_non_diagonal_ratio}")
        require(self.examples >= 1, self.name, "examples",
                f"must be >= 1, got {self.examples}")
        require(self.batch_size >= 1, self.name, "batch_size",
                f"must be >= 1, got {self.batch_size}")

    def merge_with_data(self, spec, pretrained, finetuned, data, progress):
        weight_keys = {k for k in spec.float_keys if k.endswith(".weight")
                       and len(spec.shapes[k]) == 2}
        grams, input_major = [], set()
        for task in spec.tasks:
            backbone = data.backbone(finetuned[task])
            input_major |= {name for name, m in linear_modules(backbone, weight_keys).items()
                            if is_input_major(m)}
            grams.append(input_grams(backbone, data.batches[task], weight_keys))
        linear = set.intersection(*(set(g) for g in grams))
        merged, float_keys = {}, set(spec.float_keys)
        for key, base in pretrained.items():
            if key not in float_keys:
                merged[key] = base
                continue
            weights = [to_float32(finetuned[t][key]) for t in spec.tasks]
            module = key[:-len(".weight")]
            if key.endswith(".weight") and module in linear:
                value = regmean_weight([g[module] for g in grams], weights,
                                       self.reduce_non_diagonal_ratio,
                                       transpose=module not in input_major)
            else:
                value = torch.stack(weights, dim=0).mean(dim=0)
            merged[key] = value.to(base.dtype)
        return MergeResult(self.name, self.params(), merged, spec.tasks,
                           merged_params=spec.merged_params,
                           info={"data": data.summary(), "regmean_layers": sorted(linear)})

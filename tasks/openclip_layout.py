"""The paper's own CLIP checkpoints: open_clip image encoders pickled whole by the task_vectors code.

The DTS, EMR and Task-Arithmetic authors share ``zeroshot.pt``, ``<Dataset>/finetuned.pt`` and
``head_<Dataset>.pt``: ``torch.save`` of whole modules (an
``ImageEncoder`` wrapping an open_clip ``CLIP``, a ``ClassificationHead``), whose classes live in
the authors' ``src`` package. :func:`read_module_state` reads such a file without that package and
without open_clip (:mod:`harness.torch_pickle`): every class outside a small table of inert torch
objects is rebuilt as a stand-in module, so the pickled module tree still yields its
``state_dict`` and nothing the file names is ever imported or called.

Merging happens on the open_clip keys of the visual tower, exactly the tensors the authors' code
merges (one ``in_proj_weight`` per attention block, as their SVDs see it). The text-tower
leftovers inside ``ImageEncoder`` are dropped: their task vectors are zero, and the spec's AMR
excludes such tensors anyway. :func:`to_transformers` maps a (merged) visual tower onto a
transformers ``CLIPVisionModel`` plus projection for evaluation; ``scripts/check_openclip_layout.py``
checks that mapping against open_clip's own forward pass where open_clip is installed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor

from harness.io.torch_pickle import CheckpointFileError, load_untrusted
from harness.tasks.base import SuiteUnavailableError

VISUAL_PREFIXES = ("model.visual.", "visual.")

class Checkpoint(NamedTuple):
    """A pickled module's tensors, and the activation its MLPs use where it names one."""

    state: dict[str, Tensor]
    activation: str | None


def read_module_state(path: str) -> Checkpoint:
    """The state dict of a module (or a plain state dict) pickled whole with ``torch.save``."""
    try:
        loaded = load_untrusted(path)
    except CheckpointFileError as error:
        raise SuiteUnavailableError(str(error)) from None
    if isinstance(loaded, torch.nn.Module):
        names = {type(m).__name__ for m in loaded.modules()}
        activation = ("quick_gelu" if "QuickGELU" in names else "gelu" if "GELU" in names
                      else None)
        return Checkpoint(dict(loaded.state_dict()), activation)
    if isinstance(loaded, dict) and loaded and all(isinstance(v, Tensor) for v in loaded.values()):
        return Checkpoint(dict(loaded), None)
    raise SuiteUnavailableError(f"checkpoint {path} holds a {type(loaded).__name__}, neither a "
                                "module nor a state dict")


def visual_state(state: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    """The open_clip visual tower's tensors, keys relative to it (``conv1.weight``, ...)."""
    for prefix in VISUAL_PREFIXES:
        visual = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if visual:
            missing = [k for k in ("conv1.weight", "positional_embedding", "proj")
                       if k not in visual]
            if missing:
                raise SuiteUnavailableError(f"{path}: the visual tower has no {missing}; only "
                                            "open_clip ViT image encoders are read")
            return visual
    raise SuiteUnavailableError(f"{path}: no open_clip visual tower (keys starting with "
                                f"{' or '.join(VISUAL_PREFIXES)}) in the checkpoint")


def read_head(path: str) -> tuple[Tensor, Tensor | None]:
    """A task_vectors ``ClassificationHead``: its rows (already scaled by the logit scale) and
    bias; the head L2-normalizes image features before applying them."""
    state = read_module_state(path).state
    if "weight" not in state or state["weight"].dim() != 2:
        raise SuiteUnavailableError(f"head {path} has no 2-d weight; a task_vectors "
                                    "ClassificationHead is expected")
    return state["weight"].float(), state.get("bias")


_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_TOP_NAMES = {"class_embedding": "embeddings.class_embedding",
              "positional_embedding": "embeddings.position_embedding.weight",
              "conv1.weight": "embeddings.patch_embedding.weight",
              "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
              "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}


def vision_config(visual: dict[str, Tensor], *, heads: int | None = None,
                  hidden_act: str | None = None):
    """The transformers ``CLIPVisionConfig`` of an open_clip ViT, read from its shapes (one
    attention head per 64 channels, as every open_clip ViT has, unless ``heads`` is given)."""
    from transformers import CLIPVisionConfig

    width, _, patch, _ = visual["conv1.weight"].shape
    grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
    layers = 1 + max(int(m.group(1)) for k in visual if (m := _BLOCK.match(k)))
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=visual["transformer.resblocks.0.mlp.c_fc.weight"]
        .shape[0], num_hidden_layers=layers, num_attention_heads=heads or width // 64,
        image_size=grid * patch, patch_size=patch, projection_dim=visual["proj"].shape[1],
        hidden_act=hidden_act or "quick_gelu", layer_norm_eps=1e-5)


def to_transformers(visual: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """(state dict of a transformers CLIP vision tower, projection weight) of an open_clip visual
    tower: each ``in_proj`` split into q, k, v; ``proj`` transposed into a linear weight."""
    tower: dict[str, Tensor] = {}
    for key, value in visual.items():
        if key == "proj":
            continue
        if key in _TOP_NAMES:
            tower[_TOP_NAMES[key]] = value
            continue
        match = _BLOCK.match(key)
        if not match:
            raise SuiteUnavailableError(f"open_clip key {key!r} has no transformers CLIP "
                                        "counterpart")
        layer, rest = f"encoder.layers.{match.group(1)}.", match.group(2)
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]                      # weight or bias
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                tower[f"{layer}self_attn.{part}_proj.{kind}"] = chunk
            continue
        stem, _, kind = rest.rpartition(".")
        if stem not in _BLOCK_NAMES:
            raise SuiteUnavailableError(f"open_clip key {key!r} has no transformers CLIP "
                                        "counterpart")
        tower[f"{layer}{_BLOCK_NAMES[stem]}.{kind}"] = value
    return tower, visual["proj"].T

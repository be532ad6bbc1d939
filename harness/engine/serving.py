"""Serving every task from one loaded base model: switch in place, or add low-rank paths.

``apply`` turns a model that holds a result's base weights into one task's model by writing
``base + delta`` into each changed parameter, one tensor at a time (peak extra memory: one
tensor), and back by copying the base values from the result (exact, not a subtraction).
``attach_low_rank`` leaves the weights alone and adds, for every linear layer whose task delta is
stored low-rank (DTS), ``x V^T diag(S) U^T`` to its output, so the full delta is never built;
other changed tensors (biases, norms, convolutions) are switched in place as ``apply`` does. It
keeps either the decoded float32 factors beside each layer (``keep="factors"``, fastest) or only
the 2-bit codes, decoded at every forward (``keep="codes"``: a resident task costs about its
stored bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from harness.core.tensors import cast_like, to_float32
from harness.engine.codecs import LowRank


def _parameters(model: nn.Module, keys, prefix: str) -> dict[str, Tensor]:
    """The model's tensors (parameters and buffers) for the result's keys, checked."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    out = {}
    for key in keys:
        name = prefix + key
        if name not in state:
            raise KeyError(f"the model has no tensor {name!r} for the result's key {key!r}"
                           + (" (set prefix= if the model nests the backbone)" if not prefix
                              else ""))
        out[key] = state[name]
    return out


class AppliedTask:
    """A model switched to a task; ``undo()`` (or leaving the ``with`` block) switches back."""

    def __init__(self, result, task: str, restore: dict[str, Tensor],
                 hooks: list | None = None, held_bytes: int = 0) -> None:
        self.result, self.task = result, task
        self._restore = restore              # model tensor -> key whose base value it gets back
        self._hooks = hooks or []
        self.held_bytes = held_bytes         # bytes kept beside the model for this task
        self.active = True

    def undo(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            for key, tensor in self._restore.items():
                tensor.copy_(self.result.base[key])
        for hook in self._hooks:
            hook.remove()
        self.active = False

    def __enter__(self) -> AppliedTask:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _switch(result, tensors: dict[str, Tensor], delta_of: Callable[[str], Tensor | None]
            ) -> dict[str, Tensor]:
    """Write base + delta into each tensor that has a delta; return those tensors."""
    changed = {}
    with torch.no_grad():
        for key, tensor in tensors.items():
            if not tensor.is_floating_point():
                continue
            delta = delta_of(key)
            if delta is None:
                continue
            base = to_float32(result.base[key].to(tensor.device))
            tensor.copy_(cast_like(base + delta.to(tensor.device), tensor.dtype))
            changed[key] = tensor
    return changed


def apply(result, model: nn.Module, task: str, *, prefix: str = "") -> AppliedTask:
    """Switch ``model`` (holding ``result.base``) to ``task`` in place, key by key."""
    result._check_task(task)
    tensors = _parameters(model, result.base.keys(), prefix)
    if result.kind == "shared":
        return AppliedTask(result, task, {})
    payload = result.payloads[task]
    changed = _switch(result, tensors, lambda key: payload.delta(key, result.shared))
    return AppliedTask(result, task, changed)


def attach_low_rank(result, model: nn.Module, task: str, *, prefix: str = "",
                    keep: Literal["factors", "codes"] = "factors") -> AppliedTask:
    """Serve ``task`` with each low-rank delta as an extra path beside its linear layer, keeping
    its decoded factors (``"factors"``) or only its codes, decoded at each forward
    (``"codes"``), on the layer's device."""
    result._check_task(task)
    if keep not in ("factors", "codes"):
        raise ValueError(f"keep must be 'factors' or 'codes', got {keep!r}")
    payload = result.payloads.get(task)
    if payload is None:
        raise ValueError(f"{result.method} stores no per-task payload to attach")
    tensors = _parameters(model, result.base.keys(), prefix)
    modules = dict(model.named_modules())
    hooks, low_rank, held = [], set(), 0
    for key, codec in payload.records.items():
        module_name = (prefix + key).rsplit(".", 1)[0]
        module = modules.get(module_name)
        if (isinstance(codec, LowRank) and key.endswith(".weight") and
                isinstance(module, nn.Linear) and payload.scale is None):
            codec = codec.to(module.weight.device)             # moved once, not per forward
            hook, bytes_kept = _low_rank_hook(codec, keep)
            hooks.append(module.register_forward_hook(hook))
            held += bytes_kept
            low_rank.add(key)
    changed = _switch(result, tensors, lambda key: None if key in low_rank
                      else payload.delta(key, result.shared))
    return AppliedTask(result, task, changed, hooks, held)


def _factors(codec: LowRank) -> tuple[Tensor, Tensor]:
    """``U diag(S)`` (out, r) and ``V`` (r, in), decoded on the codec's device."""
    return codec.u.decode() * codec.s, codec.v.decode()


def _low_rank_hook(codec: LowRank, keep: str):
    """A forward hook adding ``x V^T (U diag(S))^T``, with the factors decoded once
    (``"factors"``) or at every call (``"codes"``), and the bytes it keeps."""
    decoded = _factors(codec) if keep == "factors" else None
    kept = sum(t.nbytes for t in decoded) if decoded else codec.nbytes

    def hook(module, inputs, output):
        us, v = decoded or _factors(codec)
        x = inputs[0]
        extra = (x.to(v.dtype) @ v.T) @ us.T
        return output + extra.to(output.dtype)
    return hook, kept

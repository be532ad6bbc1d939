"""Serving every task from one loaded base model: switch in place, or add low-rank paths.

``apply`` turns a model that holds a result's base weights into one task's model by writing
``base + delta`` into each changed parameter, one tensor at a time (peak extra memory: one
tensor), and back by copying the base values from the result (exact, not a subtraction).
``attach_low_rank`` leaves the weights alone and adds, for every linear layer whose task delta is
stored low-rank (DTS), ``x V^T diag(S) U^T`` to its output, so the full delta is never built;
other changed tensors (biases, norms, convolutions) are switched in place as ``apply`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from harness.payload import LowRank
from harness.state_dict import cast_like, to_float32


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
                 hooks: list | None = None) -> None:
        self.result, self.task = result, task
        self._restore = restore              # model tensor -> key whose base value it gets back
        self._hooks = hooks or []
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


def attach_low_rank(result, model: nn.Module, task: str, *, prefix: str = "") -> AppliedTask:
    """Serve ``task`` with each low-rank delta as an extra path beside its linear layer."""
    result._check_task(task)
    payload = result.payloads.get(task)
    if payload is None:
        raise ValueError(f"{result.method} stores no per-task payload to attach")
    tensors = _parameters(model, result.base.keys(), prefix)
    modules = dict(model.named_modules())
    hooks, low_rank = [], set()
    for key, codec in payload.records.items():
        module_name = (prefix + key).rsplit(".", 1)[0]
        module = modules.get(module_name)
        if (isinstance(codec, LowRank) and key.endswith(".weight") and
                isinstance(module, nn.Linear) and payload.scale is None):
            u, v = codec.u.decode(), codec.v.decode()          # (out, r), (r, in)
            device = module.weight.device                      # moved once, not per forward
            hooks.append(module.register_forward_hook(
                _low_rank_hook((u * codec.s).to(device), v.to(device))))
            low_rank.add(key)
    changed = _switch(result, tensors, lambda key: None if key in low_rank
                      else payload.delta(key, result.shared))
    return AppliedTask(result, task, changed, hooks)


def _low_rank_hook(us: Tensor, v: Tensor):
    def hook(module, inputs, output):
        x = inputs[0]
        extra = (x.to(v.dtype) @ v.to(x.device).T) @ us.to(x.device).T
        return output + extra.to(output.dtype)
    return hook

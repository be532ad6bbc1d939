"""Task metrics (spec, Accounting): accuracy, Matthews correlation, F1, Pearson and Spearman,
and a metric recomputed from per-example outcomes.

Small exact implementations on tensors, so the light install needs no scipy or scikit-learn.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    return float((predictions == labels).double().mean())


def matthews_correlation(predictions: Tensor, labels: Tensor) -> float:
    """Binary MCC; 0 when a row or column of the confusion matrix is empty (as GLUE)."""
    p, y = predictions.bool(), labels.bool()
    tp, tn = float((p & y).sum()), float((~p & ~y).sum())
    fp, fn = float((p & ~y).sum()), float((~p & y).sum())
    denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def f1(predictions: Tensor, labels: Tensor) -> float:
    """F1 of the positive class (label 1)."""
    p, y = predictions.bool(), labels.bool()
    tp = float((p & y).sum())
    predicted, actual = float(p.sum()), float(y.sum())
    return 0.0 if predicted + actual == 0 else 2 * tp / (predicted + actual)


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = float(torch.sqrt((x * x).sum() * (y * y).sum()))
    return 0.0 if denominator == 0 else float((x * y).sum()) / denominator


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n with ties given their average rank (as scipy's ``rankdata``)."""
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    return ((ends - (counts.double() - 1) / 2))[inverse]


def spearman(x: Tensor, y: Tensor) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def glue_score(metric: str, predictions: Tensor, labels: Tensor) -> tuple[float, dict]:
    """(headline value, extras) of a GLUE metric name: ``accuracy``, ``mcc``, ``accuracy_f1``
    (mean of the two) or ``pearson_spearman`` (mean of the two; predictions are scores)."""
    if metric == "accuracy":
        return accuracy(predictions, labels), {}
    if metric == "mcc":
        return matthews_correlation(predictions, labels), {"accuracy": accuracy(predictions,
                                                                                labels)}
    if metric == "accuracy_f1":
        a, f = accuracy(predictions, labels), f1(predictions, labels)
        return (a + f) / 2, {"accuracy": a, "f1": f}
    if metric == "pearson_spearman":
        p, s = pearson(predictions, labels), spearman(predictions, labels)
        return (p + s) / 2, {"pearson": p, "spearman": s}
    raise ValueError(f"unknown metric {metric!r}: accuracy, mcc, accuracy_f1, pearson_spearman")


def metric_from_outcomes(metric: str, outcomes) -> float:
    """The metric of per-example ``outcomes``: the mean of ``outcomes["score"]`` (accuracy as
    1 per correct example, or any metric that is a mean over examples), else
    :func:`glue_score` of ``outcomes["prediction"]`` against ``outcomes["reference"]``."""
    if "score" in outcomes:
        return float(torch.as_tensor(outcomes["score"]).double().mean())
    return glue_score(metric, torch.as_tensor(outcomes["prediction"]),
                      torch.as_tensor(outcomes["reference"]))[0]

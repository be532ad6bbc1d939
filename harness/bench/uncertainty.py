"""Bootstrap intervals over test examples, and paired comparisons of two rows.

Each task's examples are resampled with replacement ``RESAMPLES`` times; the resampled indices
depend only on the task's name and its number of examples (a fixed seed), so every record of a
task is resampled the same way and any two rows are compared **paired**, example by example.
The metric is recomputed on every resample from the stored per-example outcomes (a mean for
accuracy; MCC, F1, Pearson and Spearman recomputed as they are). The average over tasks and the
ADR take the same resamples, task by task: replicate ``b`` of the average is the mean of the
tasks' replicates ``b``, and of the ADR ``100 (I_b - A_b) / I_b`` with the individual models'
replicate ``I_b`` on the same examples.

Intervals are the 2.5th and 97.5th percentiles of the replicates (95%). The p-value of a paired
difference is ``min(1, 2 min(P(d_b <= 0), P(d_b >= 0)))`` over the replicates ``d_b``: two-sided,
and 0 when no resample crosses zero (reported as below ``1 / RESAMPLES``).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy
import torch

from harness.core.metrics import metric_from_outcomes

RESAMPLES = 1000
LEVEL = 0.95
SEED = 20261203


def resample_indices(task: str, examples: int, resamples: int = RESAMPLES) -> numpy.ndarray:
    """``(resamples, examples)`` indices, the same for every record of this task and size."""
    rng = numpy.random.default_rng([SEED, zlib.crc32(task.encode()), examples])
    return rng.integers(0, examples, size=(resamples, examples))


def task_replicates(task: str, metric: str, outcomes: Mapping) -> numpy.ndarray:
    """The metric on each resample of ``task``'s examples."""
    arrays = {k: numpy.asarray(torch.as_tensor(v).numpy()) for k, v in outcomes.items()}
    examples = len(next(iter(arrays.values())))
    indices = resample_indices(task, examples)
    if "score" in arrays:
        return arrays["score"].astype(numpy.float64)[indices].mean(axis=1)
    return numpy.array([metric_from_outcomes(metric, {k: torch.from_numpy(v[row])
                                                      for k, v in arrays.items()})
                        for row in indices])


def interval(replicates: numpy.ndarray) -> tuple[float, float]:
    low, high = numpy.percentile(replicates, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
    return float(low), float(high)


def p_value(differences: numpy.ndarray) -> float:
    """Two-sided: twice the smaller share of resamples on either side of zero (at most 1)."""
    below, above = float(numpy.mean(differences <= 0)), float(numpy.mean(differences >= 0))
    return min(1.0, 2 * min(below, above))


@dataclass
class RowReplicates:
    """One row's replicates: per task, of the average, and of the ADR (None without the
    individual models' outcomes)."""

    tasks: dict[str, numpy.ndarray]
    average: numpy.ndarray
    adr: numpy.ndarray | None


def row_replicates(metrics: Mapping[str, str], outcomes: Mapping[str, Mapping],
                   individual: Mapping[str, Mapping] | None = None) -> RowReplicates:
    """Replicates of a row from its per-task outcomes (``metrics``: task -> metric name);
    ``individual``: the individual models' outcomes of the same tasks, for the ADR."""
    tasks = {t: task_replicates(t, metrics[t], outcomes[t]) for t in metrics}
    average = numpy.mean(numpy.stack(list(tasks.values())), axis=0)
    adr = None
    if individual is not None and all(t in individual for t in tasks):
        reference = numpy.mean(numpy.stack([task_replicates(t, metrics[t], individual[t])
                                            for t in tasks]), axis=0)
        with numpy.errstate(divide="ignore", invalid="ignore"):
            adr = 100.0 * (reference - average) / reference
    return RowReplicates(tasks, average, adr)


@dataclass
class Difference:
    """A paired difference ``a - b`` with its interval and p-value."""

    a: float
    b: float
    difference: float
    low: float
    high: float
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - LEVEL


def paired(a: float, b: float, replicates_a: numpy.ndarray,
           replicates_b: numpy.ndarray) -> Difference:
    differences = replicates_a - replicates_b
    low, high = interval(differences)
    return Difference(a, b, a - b, low, high, p_value(differences))

"""Results for notebooks: ``harness.results.load(...)`` gives records as a pandas DataFrame,
``harness.results.compare(...)`` a paired comparison of two rows (see
:mod:`harness.bench.analysis`)."""

from __future__ import annotations

from harness.bench.analysis import Comparison, ComparisonError, comparison_frame, load
from harness.bench.analysis import compare as _compare
from harness.bench.analysis import find_row, individual_row
from harness.core.defaults import default_results_dir

__all__ = ["Comparison", "ComparisonError", "compare", "load"]


def compare(a: str, b: str, suite: str, split: str = "seen",
            results: str | None = None, finetune_seed: int = 0,
            b_finetune_seed: int | None = None):
    """Rows ``a`` minus ``b`` (row labels or record files) of one suite and split, as a
    DataFrame: per task, Avg and ADR, the difference, its 95% paired-bootstrap interval and
    p-value. Labels name rows of fine-tuning seed ``finetune_seed`` (``b_finetune_seed`` for
    ``b`` where it differs). ``results``: the results folder (default: the user's,
    :func:`harness.core.defaults.default_results_dir`)."""
    results = results or default_results_dir()
    first = find_row(a, suite, split, results, finetune_seed)
    second = find_row(b, suite, split, results,
                      finetune_seed if b_finetune_seed is None else b_finetune_seed)
    comparison = _compare(first, second, individual_row(first, results))
    return comparison_frame(comparison)

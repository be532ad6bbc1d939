"""Results for notebooks: ``harness.results.load(...)`` gives records as a pandas DataFrame,
``harness.results.compare(...)`` a paired comparison of two rows (see
:mod:`harness.bench.analysis`)."""

from __future__ import annotations

from harness.bench.analysis import Comparison, ComparisonError, comparison_frame, load
from harness.bench.analysis import compare as _compare
from harness.bench.analysis import find_row, individual_row
from harness.bench.records import DEFAULT_RESULTS_DIR

__all__ = ["Comparison", "ComparisonError", "compare", "load"]


def compare(a: str, b: str, suite: str, split: str = "seen",
            results: str = DEFAULT_RESULTS_DIR):
    """Rows ``a`` minus ``b`` (row labels or record files) of one suite and split, as a
    DataFrame: per task, Avg and ADR, the difference, its 95% paired-bootstrap interval and
    p-value."""
    first, second = (find_row(spec, suite, split, results) for spec in (a, b))
    comparison = _compare(first, second, individual_row(first, results))
    return comparison_frame(comparison)

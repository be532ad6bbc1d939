"""Reading results for analysis: paired comparisons of two rows, and records as a DataFrame.

:func:`compare` tells whether two rows of one suite and split differ beyond the noise of their
test sets: per task, on the average and on ADR, the difference, its paired-bootstrap 95%
interval and p-value (:mod:`harness.bench.uncertainty`), over the same resampled examples.
:func:`load` gives every record (or those of a suite and split) as a pandas DataFrame, one line
per record and task, with the intervals, for notebooks. ``harness compare`` and
``harness.results`` are their front doors.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

from harness.bench.records import RunRecord, read_outcomes, read_record, read_records
from harness.bench.uncertainty import Difference, paired, row_replicates


class ComparisonError(ValueError):
    """Two rows that cannot be compared, or a row that cannot be found; the message says which."""


def find_row(spec: str, suite: str, split: str, results_dir: str,
             finetune_seed: int = 0) -> RunRecord:
    """The record ``spec`` names: a record file, or a row label of the suite's split (the
    leaderboard's label, or the method's name when one record has it) among the records of
    fine-tuning seed ``finetune_seed``."""
    if spec.endswith(".json") or os.path.sep in spec:
        record, problem = read_record(spec)
        if record is None:
            raise ComparisonError(f"{spec}: {problem}")
        return record
    records = [r for r in read_records(os.path.join(results_dir, suite, split))[0]
               if r.measured and r.finetune_seed == finetune_seed]
    found = [r for r in records if r.label == spec] or [r for r in records if r.method == spec]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ComparisonError(f"{spec!r} names {len(found)} rows of {suite} ({split}): "
                              + ", ".join(repr(r.label) for r in found)
                              + "; name a row label or a record file")
    labels = sorted({r.label for r in records})
    close = difflib.get_close_matches(spec, labels, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ComparisonError(f"no row {spec!r} in {os.path.join(results_dir, suite, split)}."
                          f"{hint} Rows: {', '.join(map(repr, labels)) or 'none'}")


@dataclass
class Comparison:
    """Paired differences of row ``a`` minus row ``b``: per task, then "Avg" (and "ADR" where
    both rows have the individual models' outcomes)."""

    a: RunRecord
    b: RunRecord
    rows: dict[str, Difference]


def compare(a: RunRecord, b: RunRecord, individual: RunRecord | None = None) -> Comparison:
    """Compare two rows of one suite and split over the same test examples."""
    for name in ("suite", "split"):
        if getattr(a, name) != getattr(b, name):
            raise ComparisonError(f"{a.path} and {b.path} are from different {name}s "
                                  f"({getattr(a, name)!r} and {getattr(b, name)!r})")
    if a.task_order != b.task_order or any(a.tasks[t].examples != b.tasks[t].examples
                                           or a.tasks[t].metric != b.tasks[t].metric
                                           for t in a.task_order):
        raise ComparisonError(f"{a.path} and {b.path} were scored on different test sets "
                              "(tasks, metrics or numbers of examples differ)")
    outcomes = []
    for record in (a, b):
        found, why = read_outcomes(record)
        if found is None:
            raise ComparisonError(f"{record.path}: no per-example outcomes ({why}); rerun it "
                                  "with --force to record them")
        outcomes.append(found)
    for task in a.task_order:
        ref_a, ref_b = outcomes[0][task].get("reference"), outcomes[1][task].get("reference")
        if ref_a is not None and ref_b is not None and not bool((ref_a == ref_b).all()):
            raise ComparisonError(f"{a.path} and {b.path} hold different test labels for "
                                  f"task {task!r}: not the same test set")
    reference = read_outcomes(individual)[0] if individual is not None else None
    metrics = {t: a.tasks[t].metric for t in a.task_order}
    ra, rb = (row_replicates(metrics, o, reference) for o in outcomes)
    rows = {t: paired(a.tasks[t].value, b.tasks[t].value, ra.tasks[t], rb.tasks[t])
            for t in a.task_order}
    rows["Avg"] = paired(a.average, b.average, ra.average, rb.average)
    if ra.adr is not None and rb.adr is not None and a.adr is not None and b.adr is not None:
        rows["ADR"] = paired(a.adr, b.adr, ra.adr, rb.adr)
    return Comparison(a, b, rows)


def individual_row(record: RunRecord, results_dir: str) -> RunRecord | None:
    """The individual models' record of ``record``'s suite, split and task models (its
    fine-tuning seed, its config), where there is one."""
    for other in read_records(os.path.join(results_dir, record.suite, record.split))[0]:
        if other.method == "individual" and \
                (other.suite_options or {}) == (record.suite_options or {}):
            return other
    return None


def load(results: str | list[str], suite: str | None = None, split: str | None = None):
    """Every record under ``results`` (a folder, or a list of folders and record files), or
    those of ``suite`` and ``split``, as a pandas DataFrame: one line per record and task, then
    one per record for "Avg" and one for "ADR", with ``value``, ``low`` and ``high`` (the 95%
    interval, None where the record has none) and the record's identity columns."""
    try:
        import pandas
    except ImportError:
        raise ImportError("harness.results.load needs pandas: pip install pandas") from None
    sources = [results] if isinstance(results, str) else list(results)
    records: list[RunRecord] = []
    for source in sources:
        if os.path.isdir(source):
            records += read_records(source)[0]
        else:
            record, problem = read_record(source)
            if record is None:
                raise ValueError(f"{source}: {problem}")
            records.append(record)
    lines = []
    for r in records:
        if (suite and r.suite != suite) or (split and r.split != split) or not r.measured:
            continue
        identity = {"suite": r.suite, "split": r.split, "method": r.method, "label": r.label,
                    "seed": r.seed, "finetune_seed": r.finetune_seed, "status": r.status,
                    "record": r.path}
        for task in r.task_order:
            score = r.tasks[task]
            low, high = score.interval or (None, None)
            lines.append({**identity, "task": task, "metric": score.metric,
                          "value": score.value, "low": low, "high": high,
                          "examples": score.examples})
        for name, value, bounds in (("Avg", r.average, r.average_interval),
                                    ("ADR", r.adr, r.adr_interval)):
            if value is not None:
                low, high = bounds or (None, None)
                lines.append({**identity, "task": name, "metric": name.lower(),
                              "value": value, "low": low, "high": high, "examples": None})
    return pandas.DataFrame(lines)


def comparison_frame(comparison: Comparison):
    """A :class:`Comparison` as a pandas DataFrame (one line per task, then Avg and ADR)."""
    import pandas

    return pandas.DataFrame([{"task": name, "a": d.a, "b": d.b, "difference": d.difference,
                              "low": d.low, "high": d.high, "p_value": d.p_value,
                              "significant": d.significant}
                             for name, d in comparison.rows.items()])

"""Markdown leaderboards rendered from result records, one file per suite.

Reads only result records (:mod:`harness.bench.records`): rows are methods (one per
hyperparameter set and seed), ordered by what each method declares (kind, year, family), columns
the split's tasks, then Avg, ADR and AMR. As in the DTS paper, among merging
methods the best value of each task column, Avg and ADR is bold and the second in italics
(the paper underlines it);
the reference rows (pretrained, individual) are not ranked.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass

from tabulate import tabulate

from harness.bench.records import RunRecord, Skipped, read_outcomes, read_records
from harness.bench.uncertainty import paired, row_replicates
from harness.core.registry import METHODS, SUITES, UnknownNameError

REFERENCE = ("pretrained", "individual")


@dataclass
class Rendered:
    suite: str
    path: str
    text: str


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _row_key(record: RunRecord) -> tuple:
    """Reference rows first; then shared methods before personalized ones, each by what the
    method declares (year, then family), then name; methods not installed here last."""
    method = record.method
    tail = (method, record.label, record.seed)
    if method in REFERENCE:
        return (0, REFERENCE.index(method), "", *tail)
    cls = _method_class(method)
    if cls is None:
        return (3, 0, "", *tail)
    return (1 if cls.kind == "shared" else 2, cls.year, cls.family, *tail)


@functools.cache
def _method_class(name: str):
    """The registered class of ``name``, or None where it is not installed."""
    try:
        return METHODS.get(name)
    except (UnknownNameError, ImportError):
        return None


BEST, SECOND = "**{}**", "_{}_"       # plain Markdown: bold and italics render everywhere


def _mark(cells: list[list[str]], column: int, rows: list[int], values: list[float | None],
          lower_is_better: bool) -> None:
    """Bold the best and italicize the second-best distinct value among ``rows`` (the paper
    underlines it; Markdown has no underline that every viewer renders)."""
    distinct = sorted({values[r] for r in rows if values[r] is not None},
                      reverse=not lower_is_better)
    marks = {}
    if distinct:
        marks[distinct[0]] = BEST
    if len(distinct) > 1:
        marks[distinct[1]] = SECOND
    for r in rows:
        if values[r] is not None and values[r] in marks:
            text = cells[r][column]
            number, dagger = (text[:-1], "†") if text.endswith("†") else (text, "")
            cells[r][column] = marks[values[r]].format(number) + dagger


def display_label(method: str, label: str) -> str:
    """A row label as the paper writes it: the method's declared display name (``DTS-D*``,
    ``Ties-Merging``) in place of its registry name, hyperparameters kept; Markdown's ``*``
    escaped. Labels of methods not installed here stay as stored."""
    cls = _method_class(method)
    name = (cls.display_name or method) if cls is not None else None
    if method in REFERENCE:
        name = method.title()
    if name is not None and label.startswith(method):
        label = name + label[len(method):]
    return label.replace("*", "\\*")


def _base_label(record: RunRecord) -> str:
    """The record's row label, marked when an unseen split used similarity weights (Table 6)
    and when the merge saw data (``‡``: unlabeled examples of the tasks, which the record's
    ``merge_info["data"]`` counts)."""
    label = display_label(record.method, record.label)
    if isinstance(record.merge_info, dict) and record.merge_info.get("data"):
        label += " ‡"
    if record.unseen_weighting == "similarity":
        return f"{label} + similarity weights"
    return label


def render_table(records: list[RunRecord]) -> str:
    """One split's table: reference rows first, then the methods (see :func:`_row_key`).

    Each figure shows half its 95% bootstrap interval (``70.53 ± 2.10``) where the record has
    one; records that differ only by seed (DARE's) make one row of their mean ± standard
    deviation over seeds. Among merging methods the best of each column is bold, the second
    in italics, and every single-seed row whose paired difference from the best is not
    significant (p >= 0.05) is marked ``†`` (:mod:`harness.bench.uncertainty`)."""
    records = sorted(records, key=_row_key)
    rows = list(_rows(records).values())
    tasks: list[str] = []
    for record in records:
        tasks += [t for t in record.task_order if t not in tasks]
    columns = [*tasks, "Avg", "ADR"]
    values = [[_group_figure(group, column) for column in columns] for group in rows]
    ranked = [i for i, group in enumerate(rows) if group[0].method not in REFERENCE]
    single = [i for i in ranked if len(rows[i]) == 1]
    ties = _close_to_best([group[0] for group in rows], columns, values, single)
    cells = []
    for i, group in enumerate(rows):
        label = _base_label(group[0])
        if len(group) > 1:
            label += f" (mean ± sd, {len(group)} seeds)"
        row = [label]
        for c, column in enumerate(columns):
            value, half = values[i][c]
            scale = 1 if column == "ADR" else 100
            text = "–" if value is None else f"{scale * value:.2f}"
            if value is not None and half is not None:
                text += f" ± {scale * half:.2f}"
            row.append(text + ("†" if (i, c) in ties else ""))
        amr = group[0].amr
        amr_text = "–" if amr is None else _num(amr.mean) + (
            f" ({amr.paper_mean:.2f})" if amr.paper_mean is not None else "")
        cells.append(row + [amr_text])
    for c, column in enumerate(columns):
        _mark(cells, c + 1, ranked, [values[i][c][0] for i in range(len(rows))],
              lower_is_better=column == "ADR")
    headers = ["Method", *columns, "AMR"]
    return tabulate(cells, headers, tablefmt="github", disable_numparse=True,
                    colalign=("left", *["right"] * (len(headers) - 1)))


def _rows(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """A leaderboard's rows, in the order of ``records``: records that differ only by seed
    (one label) make one row."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for record in records:
        groups[_base_label(record)].append(record)
    return groups


def _group_figure(group: list[RunRecord], column: str) -> tuple[float | None, float | None]:
    """A row's (value, ±): one record's value and half its interval, or over several seeds
    their mean and standard deviation."""
    if len(group) == 1:
        return _figure(group[0], column)
    found = [v for v, _ in (_figure(r, column) for r in group) if v is not None]
    if not found:
        return None, None
    return statistics.mean(found), statistics.stdev(found) if len(found) > 1 else None


def _figure(record: RunRecord, column: str) -> tuple[float | None, float | None]:
    """(value, half its interval) of one column of a record (None where it has none)."""
    if column == "Avg":
        value, bounds = record.average, record.average_interval
    elif column == "ADR":
        value, bounds = record.adr, record.adr_interval
    else:
        score = record.tasks.get(column)
        value, bounds = (None, None) if score is None else (score.value, score.interval)
    return value, None if not bounds else (bounds[1] - bounds[0]) / 2


def _close_to_best(records, columns, values, ranked) -> set[tuple[int, int]]:
    """(row, column) cells of ranked rows not significantly different from their column's
    best ranked row, by a paired bootstrap over the same test examples (``records``: one per
    row; ``ranked``: the rows that may be compared)."""
    if not ranked:
        return set()
    loaded = {i: read_outcomes(records[i])[0] for i in ranked}
    individual = next((read_outcomes(r)[0] for r in records if r.method == "individual"), None)
    replicates: dict[int, object] = {}

    def of(i):
        if i not in replicates:
            record, outcomes = records[i], loaded[i]
            replicates[i] = None if outcomes is None else row_replicates(
                {t: record.tasks[t].metric for t in record.task_order}, outcomes, individual)
        return replicates[i]

    close = set()
    for c, column in enumerate(columns):
        present = [i for i in ranked if values[i][c][0] is not None]
        if len(present) < 2:
            continue
        pick = min if column == "ADR" else max
        best = pick(present, key=lambda i: values[i][c][0])
        best_replicates = _column(of(best), column)
        if best_replicates is None:
            continue
        for i in present:
            other = _column(of(i), column)
            if i == best or other is None or values[i][c][0] == values[best][c][0]:
                continue
            if not paired(values[best][c][0], values[i][c][0], best_replicates,
                          other).significant:
                close.add((i, c))
    return close


def _column(replicates, column: str):
    if replicates is None:
        return None
    if column == "Avg":
        return replicates.average
    if column == "ADR":
        return replicates.adr
    return replicates.tasks.get(column)


def _runs_table(records: list[RunRecord]) -> str:
    """The runs (time, memory, where and when), then each run's hyperparameters and result
    file as a list: two parts that each read at 120 columns."""
    rows, details = [], []
    for r in sorted(records, key=lambda r: (r.split, _row_key(r))):
        prov = r.provenance
        seed = str(r.seed) + (f", fine-tuning {r.finetune_seed}" if r.finetune_seed else "")
        merge, peak = r.merge_seconds, r.peak_rss_bytes
        resumed = (r.merge_info or {}).get("resumed_from_step")
        rows.append([r.split, _base_label(r), seed,
                     "–" if merge is None else f"{merge:.1f}"
                     + (f", resumed at step {resumed}" if resumed else ""),
                     "–" if peak is None else f"{peak / 2**30:.2f}",
                     prov.get("device", "–"), (prov.get("git_commit") or "–")[:12],
                     prov.get("created", "–")[:10]])
        hps = ", ".join(f"{k}={v}" for k, v in sorted(r.hyperparameters.items()))
        chosen = ", ".join(f"{k}={_compact(v)}" for k, v in sorted((r.merge_info or {}).items())
                           if k == "density")
        details.append(f"- {r.split}, {_base_label(r)}, seed {seed}: "
                       + (hps or "no hyperparameters")
                       + (f"; chosen at run time: {chosen}" if chosen else "")
                       + f"; `{os.path.basename(r.path or '–')}`")
    headers = ["Split", "Row", "Seed", "Merge s", "Peak RSS GiB", "Device", "Commit", "Date"]
    return "\n".join([tabulate(rows, headers, tablefmt="github", disable_numparse=True), "",
                      "Hyperparameters and result files:", "", *details])


def _compact(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_name(suite: str, split: str) -> str:
    return f"{suite}-{split}.svg"


def split_plot(suite: str, split: str, records: list[RunRecord]) -> str | None:
    """The SVG of a split's accuracy-memory trade-off (:mod:`harness.bench.plot`): one point
    per merging row with an AMR, from the published task models; None with fewer than two
    such rows or without matplotlib."""
    from harness.bench import plot

    groups = _rows(sorted((r for r in records if r.split == split and r.measured
                           and r.finetune_seed == 0), key=_row_key))
    points, individual = [], None
    for label, group in groups.items():
        average, half = _group_figure(group, "Avg")
        if group[0].method == "individual":
            individual = None if average is None else 100 * average
        if group[0].method in REFERENCE or average is None or group[0].amr is None:
            continue
        low = high = None
        if len(group) == 1 and group[0].average_interval:
            low, high = (100 * v for v in group[0].average_interval)
        elif half is not None:
            low, high = 100 * (average - half), 100 * (average + half)
        points.append(plot.Point(label.replace("\\*", "*"), group[0].amr.mean, 100 * average,
                                 low, high))
    if len(points) < 2 or not plot.available():
        return None
    title = f"{suite}, {split} tasks: average accuracy against extra memory"
    return plot.tradeoff_svg(points, title, individual)


def render_suite(suite: str, records: list[RunRecord], results_dir: str | list[str],
                 reported: dict | None = None, plots: tuple[str, ...] = ()) -> str:
    by_split = defaultdict(list)
    for record in records:
        if record.finetune_seed == 0:           # the published task models
            by_split[record.split].append(record)
    metrics = _metrics_text(suite, records)
    lines = [
        f"# Leaderboard: `{suite}`", "",
        "Generated by `harness leaderboard` from the result files in "
        + " and ".join(f"`{os.path.join(d, suite)}`" for d in
                       ([results_dir] if isinstance(results_dir, str) else results_dir))
        + "; do not edit by hand.", "",
        f"{metrics}, in percent. "
        "ADR: accuracy drop rate against the "
        "individually fine-tuned models (percent, lower is better). AMR: bytes stored per task "
        "over the float32 bytes of the merged parameters (percent, mean over tasks); DTS rows "
        "give the paper's bit count in parentheses. Among merging methods the best value of a "
        "column is **bold** and the second _in italics_ (the paper underlines it). ± is half the 95% bootstrap "
        "interval over test examples (1,000 resamples); † marks a row not significantly "
        "different from the column's best (paired bootstrap, p ≥ 0.05); ‡ marks a merge that "
        "saw unlabeled examples of the tasks (the record says which split and how many). A "
        "row without per-example outcomes (an older record) shows no interval.", "",
    ]
    titles = {"seen": "Seen tasks (merged)",
              "unseen": "Unseen tasks (not merged; served from the seen tasks' result)"}
    for split in ("seen", "unseen"):
        lines += [f"## {titles[split]}", ""]
        lines += _split_section(by_split[split])
        if split in plots:
            lines += [f"![{suite}, {split} tasks: average accuracy against AMR, with the "
                      f"Pareto front]({plot_name(suite, split)})", ""]
    other_seeds = sorted({r.finetune_seed for r in records} - {0})
    if other_seeds:
        lines += render_finetunings(records, other_seeds)
    if reported:
        lines += render_reported(reported, by_split)
    if records:
        lines += ["## Runs and provenance", "", _runs_table(records), ""]
    return "\n".join(lines)


def _metrics_text(suite: str, records: list[RunRecord]) -> str:
    """"Task metric: accuracy", or the metric of every task that differs from the most common
    one; from the records, else from the suite's own task list (through the registry)."""
    per_task = {t: score.metric for r in records for t, score in r.tasks.items()}
    if not per_task:
        try:
            per_task = {t.name: t.metric for t in SUITES.get(suite)().tasks}
        except Exception:                  # not installed, or its config cannot be read here
            per_task = {}
    if not per_task:
        return "Task metric: as the suite defines"
    common = max(sorted(set(per_task.values())), key=list(per_task.values()).count)
    others = {t: m for t, m in per_task.items() if m != common}
    return f"Task metric: {common}" + (
        " (" + ", ".join(f"{t}: {m}" for t, m in others.items()) + ")" if others else "")


def _split_section(records: list[RunRecord]) -> list[str]:
    """One split's table, then the methods not applicable on it, with their reasons."""
    lines = []
    measured = [r for r in records if r.measured]
    lines += [render_table(measured), ""] if measured else ["No results yet.", ""]
    inapplicable = sorted((r for r in records if r.status == "not-applicable"), key=_row_key)
    if inapplicable:
        lines += ["Not applicable on this suite (the run stopped before merging, as the "
                  "spec asks):", ""]
        lines += [f"- `{r.label}`: {r.reason}" for r in inapplicable] + [""]
    failed = sorted((r for r in records if r.status == "failed"), key=_row_key)
    if failed:
        lines += ["Failed in a sweep (twice; the next `harness sweep` runs them again):", ""]
        lines += [f"- `{r.label}` seed {r.seed}: {r.reason}" for r in failed] + [""]
    return lines


def render_finetunings(records: list[RunRecord], other_seeds: list[int]) -> list[str]:
    """The tables of task models fine-tuned with other seeds (``--finetune-seed``), then the
    spread of each row's Avg and ADR between fine-tunings: a source of variation that the
    test-set intervals above do not include."""
    lines = ["## Other fine-tunings of the task models", "",
             "The same backbone and data, the task models fine-tuned with another seed "
             "(`--finetune-seed N`); ADR is against that seed's own individual models.", ""]
    for seed in other_seeds:
        for split in ("seen", "unseen"):
            chosen = [r for r in records if r.finetune_seed == seed and r.split == split]
            if chosen:
                lines += [f"### Fine-tuning seed {seed}: {split} tasks", ""]
                lines += _split_section(chosen)
    lines += ["### Spread between fine-tunings", "",
              "Each row's Avg and ADR under every fine-tuning seed it was run with, and their "
              "mean ± standard deviation over those seeds.", ""]
    seeds = [0, *other_seeds]
    cells = []
    for split in ("seen", "unseen"):
        groups: dict[str, dict[int, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
        for r in sorted((r for r in records if r.split == split and r.measured), key=_row_key):
            groups[_base_label(r)][r.finetune_seed].append(r)
        for label, by_seed in groups.items():
            if len(by_seed) < 2:
                continue
            row = [split, label]
            for column in ("Avg", "ADR"):
                scale = 1 if column == "ADR" else 100
                found = {s: _group_figure(by_seed[s], column)[0] for s in seeds if s in by_seed}
                row += ["–" if found.get(s) is None else f"{scale * found[s]:.2f}"
                        for s in seeds]
                known = [v for v in found.values() if v is not None]
                row.append(f"{scale * statistics.mean(known):.2f} ± "
                           f"{scale * statistics.stdev(known):.2f}" if len(known) > 1 else "–")
            cells.append(row)
    headers = ["Split", "Row", *(f"Avg, seed {s}" for s in seeds), "Avg mean ± sd",
               *(f"ADR, seed {s}" for s in seeds), "ADR mean ± sd"]
    if cells:
        lines += [tabulate(cells, headers, tablefmt="github", disable_numparse=True,
                           colalign=("left", "left", *["right"] * (len(headers) - 2))), ""]
    else:
        lines += ["No row has results under two fine-tuning seeds yet.", ""]
    return lines


def _reported_label(row: dict) -> str:
    """The paper's name for the row, marked reported, and ° where this harness has no such
    method."""
    missing = row["method"] not in REFERENCE and _method_class(row["method"]) is None
    return f"{row['paper_name']} (reported)".replace("*", "\\*") + (" °" if missing else "")


def render_reported(reported: dict, measured: dict[str, list[RunRecord]]) -> list[str]:
    """The paper's own tables, rows marked reported, and measured minus reported per task where
    a measured split has exactly a reported table's tasks."""
    lines = ["## Reported by the paper (not measured here)", "",
             f"Figures as printed in {reported['source']}, copied from its tables by "
             "`scripts/extract_reported.py` into `tasks/reported/"
             f"{reported['suite']}.json` (each number with its table). They are never used as "
             "measured results. Bold and italics mark the best and second best merging method "
             "of each column (tasks, Avg, ADR), recomputed from the figures; ° marks a method "
             "this harness does not implement.", ""]
    for table in reported["tables"]:
        merged = "tasks merged" if table["split"] == "seen" else "unseen tasks"
        lines += [f"### {table['table']}, {merged}: {', '.join(table['tasks'])}", "",
                  f"_{table['caption']}_", ""]
        extras = [k for k in ("average", "adr", "amr") if any(k in r for r in table["rows"])]
        values = [[r["tasks"].get(t) for t in table["tasks"]] + [r.get(k) for k in extras]
                  for r in table["rows"]]
        cells = [[_reported_label(r), *[_num(v) for v in row]]
                 for r, row in zip(table["rows"], values)]
        ranked = [i for i, r in enumerate(table["rows"]) if r["method"] not in REFERENCE]
        columns = [*table["tasks"], *extras]
        for c, column in enumerate(columns):        # the paper's marks, recomputed
            if column != "amr":
                _mark(cells, c + 1, ranked, [row[c] for row in values],
                      lower_is_better=column == "adr")
        missing = sorted({r["paper_name"] for r in table["rows"] if r["method"] not in REFERENCE
                          and _method_class(r["method"]) is None})
        headers = ["Method", *table["tasks"], *[{"average": "Avg", "adr": "ADR",
                                                 "amr": "AMR"}[k] for k in extras]]
        lines += [tabulate(cells, headers, tablefmt="github", disable_numparse=True), ""]
        if missing:
            lines += ["Not implemented in this harness (reported only): "
                      + ", ".join(missing) + ".", ""]
    for split, records in measured.items():
        tasks = [t for r in records for t in r.task_order]
        for table in reported["tables"]:
            if table["split"] != split or set(table["tasks"]) != set(tasks):
                continue
            by_method = {r["method"]: r for r in table["rows"]}
            rows = []
            for record in sorted(records, key=_row_key):
                row = by_method.get(record.method)
                if row is None or not record.measured:
                    continue
                deltas = [_delta(_value(record.tasks.get(t)), row["tasks"].get(t))
                          for t in table["tasks"]]
                rows.append([_base_label(record), *deltas,
                             _delta(record.average, row.get("average"))])
            if rows:
                lines += [f"### Measured minus reported: {split} split against "
                          f"{table['table']}", "",
                          "Points (measured − reported); the measured rows are this "
                          "leaderboard's, the reported ones the paper's.", "",
                          tabulate(rows, ["Method", *table["tasks"], "Avg"], tablefmt="github",
                                   disable_numparse=True), ""]
    return lines


def _value(score) -> float | None:
    return None if score is None else score.value


def _delta(measured: float | None, reported: float | None) -> str:
    if measured is None or reported is None:
        return "–"
    return f"{100 * measured - reported:+.2f}"


def read_reported(folder: str) -> dict[str, dict]:
    """The paper's figures per suite (``<folder>/<suite>.json``)."""
    out = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    entry = json.load(f)
                out[entry["suite"]] = entry
    return out


REPORTED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "tasks", "reported")     # the paper's figures, installed with suites


def read_all_records(results_dirs: list[str]) -> tuple[list[RunRecord], list[Skipped]]:
    """The records of several results folders; where two hold a record of the same cell (the
    same file name under the same suite and split), the first folder's is kept."""
    records, skipped, seen = [], [], set()
    for folder in results_dirs:
        found, bad = read_records(folder)
        skipped += bad
        for record in found:
            cell = os.path.relpath(record.path, folder)
            if cell not in seen:
                seen.add(cell)
                records.append(record)
    return records, skipped


def render_all(results_dir: str | list[str], out_dir: str, suite: str | None = None,
               reported_dir: str | None = None) -> tuple[list[Rendered], list[Skipped]]:
    """Markdown for every suite with results or the paper's reported figures (or one suite)
    from one or several results folders, and the files skipped. Reported figures come with
    the suites (``tasks/reported/``) unless ``reported_dir`` says otherwise."""
    folders = [results_dir] if isinstance(results_dir, str) else list(results_dir)
    records, skipped = read_all_records(folders)
    reported = read_reported(REPORTED_DIR if reported_dir is None else reported_dir)
    by_suite = defaultdict(list)
    for record in records:
        by_suite[record.suite].append(record)
    names = [suite] if suite else sorted(set(by_suite) | set(reported))
    rendered = []
    for name in names:
        plots = {split: svg for split in ("seen", "unseen")
                 if (svg := split_plot(name, split, by_suite[name])) is not None}
        rendered.append(Rendered(name, os.path.join(out_dir, f"{name}.md"),
                                 render_suite(name, by_suite[name], folders,
                                              reported.get(name), tuple(plots))))
        rendered += [Rendered(name, os.path.join(out_dir, plot_name(name, split)), svg)
                     for split, svg in plots.items()]
    return rendered, skipped

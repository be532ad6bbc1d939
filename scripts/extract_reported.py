"""Write tasks/reported/<suite>.json from the DTS paper's own tables (1-5, 7-10).

    python scripts/extract_reported.py [--paper ../shared/paper/dts-paper.txt]

The paper's text keeps each table as tab-separated lines under its caption. Every number is
stored with the table it comes from, the paper's method name and ours, and the split it belongs
to; leaderboards show these as rows marked "reported" and never mix them with measured results.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from harness.io.files import write_json_atomic

SOURCE = "DTS: Decomposition, Thresholding, Scaling (arXiv 2512.01461)"
# table number -> (suite, what was merged and evaluated)
TABLES = {1: "vit-b32", 2: "roberta-glue", 3: "qwen", 4: "vit-b32", 5: "gpt2-glue",
          7: "vit-l14", 8: "gpt2-glue", 9: "vit-l14", 10: "qwen"}
COLUMNS = {"SUN397": "sun397", "Cars": "cars", "RESISC45": "resisc45", "EuroSAT": "eurosat",
           "SVHN": "svhn", "GTSRB": "gtsrb", "MNIST": "mnist", "DTD": "dtd", "CoLA": "cola",
           "SST2": "sst2", "SST-2": "sst2", "MRPC": "mrpc", "STS": "stsb", "QQP": "qqp",
           "MNLI": "mnli", "QNLI": "qnli", "RTE": "rte", "MMLU": "mmlu",
           "TruthfulQA": "truthfulqa", "BBQ": "bbq"}
METHODS = {"Individual": "individual", "Weight-Averaging": "weight-averaging",
           "Task-Arithmetic": "task-arithmetic", "Ties-Merging": "ties", "DARE": "dare",
           "SVD": "svd", "EMR-Merging": "emr", "EMR-MERGING": "emr", "TALL-Mask": "tall-mask",
           "T-Switch": "t-switch", "DTS-T": "dts-t", "DTS-D": "dts-d", "DTS-T*": "dts-t-star",
           "DTS-D*": "dts-d-star", "Fisher-Merging": "fisher", "RegMean": "regmean",
           # the paper's AdaMerging figures are the layer-wise variant's (ViT-B/32: 80.16)
           "AdaMerging": "adamerging-layer"}


def number(cell: str) -> float | None:
    cell = re.sub(r"</?u>|\*\*", "", cell).strip()
    return None if cell in ("", "–", "-") else float(cell)


def parse_table(lines: list[str], number_: int) -> dict:
    """One table: caption, and per split its task columns and rows."""
    caption = lines[0]
    header = lines[2].split("\t")
    body = 3
    if "Seen Tasks" in header[1]:                      # a second header line names the columns
        header = ["Method", *lines[3].split("\t")[1:]]
        body = 4
    splits = [{"split": "seen", "tasks": [], "columns": []}]
    for i, name in enumerate(header[1:], start=1):
        name = name.split(" \\")[0].strip()
        if name in COLUMNS:
            if splits[-1]["columns"] and splits[-1]["columns"][-1][1] == "average":
                splits.append({"split": "unseen", "tasks": [], "columns": []})
            splits[-1]["tasks"].append(COLUMNS[name])
            splits[-1]["columns"].append((i, COLUMNS[name]))
        elif name.startswith("Avg"):
            splits[-1]["columns"].append((i, "average"))
        elif name in ("ADR", "AMR"):
            splits[-1]["columns"].append((i, name.lower()))
        elif name:
            raise ValueError(f"Table {number_}: unknown column {name!r}")
    if "Unseen Task" in lines[2] and len(splits) == 1:  # Table 10: one unseen task, no average
        last = splits[0]["columns"].pop()
        splits[0]["tasks"].pop()
        splits.append({"split": "unseen", "tasks": [last[1]], "columns": [last]})
    tables = []
    for part in splits:
        rows = []
        for line in lines[body:]:
            cells = line.split("\t")
            paper_name = re.sub(r"\s*\(.*\)$", "", cells[0]).strip()
            row = {"paper_name": paper_name,
                   "method": METHODS.get(paper_name, paper_name.lower().replace(" ", "-"))}
            values = {key: number(cells[i]) for i, key in part["columns"] if i < len(cells)}
            row["tasks"] = {t: values[t] for t in part["tasks"] if values.get(t) is not None}
            for key in ("average", "adr", "amr"):
                if values.get(key) is not None:
                    row[key] = values[key]
            rows.append(row)
        tables.append({"table": f"Table {number_}", "caption": caption, "split": part["split"],
                       "tasks": part["tasks"], "rows": rows})
    return tables


def extract(text: str) -> dict[str, dict]:
    lines = text.splitlines()
    out: dict[str, dict] = {}
    for start, line in enumerate(lines):
        match = re.match(r"Table (\d+):", line)
        if not match or int(match.group(1)) not in TABLES:
            continue
        end = start + 2
        while end < len(lines) and lines[end].strip():
            end += 1
        suite = TABLES[int(match.group(1))]
        entry = out.setdefault(suite, {"suite": suite, "source": SOURCE, "tables": []})
        entry["tables"] += parse_table(lines[start:end], int(match.group(1)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paper", default=os.path.join("..", "shared", "paper",
                                                       "dts-paper.txt"))
    parser.add_argument("--out", default=os.path.join("tasks", "reported"))
    args = parser.parse_args()
    with open(args.paper, encoding="utf-8") as f:
        reported = extract(f.read())
    for suite, entry in sorted(reported.items()):
        path = os.path.join(args.out, f"{suite}.json")
        write_json_atomic(path, entry)
        count = sum(len(r["tasks"]) + sum(k in r for k in ("average", "adr", "amr"))
                    for t in entry["tables"] for r in t["rows"])
        print(f"wrote {path}: {len(entry['tables'])} tables, {count} numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

import json
import os

import pytest

from harness.io.files import write_json_atomic
from harness.bench.leaderboard import render_all
from harness.bench.records import SCHEMA_VERSION, RunRecord, read_records, write_record

EXPECTED = os.path.join(os.path.dirname(__file__), "..", "data", "expected_leaderboard.md")


def record(method, label, split, values, adr=None, amr=None, paper=None, seed=0, hps=None):
    tasks = {t: {"metric": "accuracy", "value": v, "extras": {}, "examples": 100}
             for t, v in values.items()}
    return {
        "suite": "demo", "split": split, "method": method, "label": label,
        "hyperparameters": hps or {}, "seed": seed, "task_order": list(values),
        "tasks": tasks, "average": sum(values.values()) / len(values), "adr": adr,
        "amr": None if amr is None else {"per_task": {}, "mean": amr, "paper_mean": paper},
        "merge_seconds": 1.5, "peak_rss_bytes": 2**30,
        "provenance": {"device": "cpu", "git_commit": "0123456789abcdef",
                       "created": "2026-11-25T00:00:00+00:00"},
    }


FIXTURE = [
    record("pretrained", "Pretrained", "seen", {"t2": 0.5, "t1": 0.6}),
    record("individual", "Individual", "seen", {"t2": 0.9, "t1": 1.0}),
    record("ties", "ties", "seen", {"t2": 0.7, "t1": 0.8}, adr=21.05, amr=0.0,
           hps={"k": 20.0}),
    record("dts-d", "dts-d", "seen", {"t2": 0.88, "t1": 0.97}, adr=2.63, amr=3.1, paper=4.4),
    record("dts-d", "dts-d (density=0.1)", "seen", {"t2": 0.85, "t1": 0.99}, adr=3.68, amr=1.2,
           paper=1.5, hps={"density": 0.1}),
    record("emr", "emr", "seen", {"t2": 0.88, "t1": 0.9}, adr=6.32, amr=3.13),
    record("ties", "ties", "seen", {"t2": 0.72, "t1": 0.79}, adr=20.0, amr=0.0, seed=1),
    record("my-plugin", "my-plugin", "unseen", {"t3": 0.4}, adr=50.0, amr=0.0),
    record("dts-d", "dts-d", "unseen", {"t3": 0.6}, adr=25.0, amr=3.1, paper=4.4),
    record("individual", "Individual", "unseen", {"t3": 0.8}),
]


def typed(data: dict) -> RunRecord:
    return RunRecord.from_json({"schema_version": SCHEMA_VERSION, **data})


def write_fixture(folder):
    for i, r in enumerate(FIXTURE):
        write_record(os.path.join(folder, "demo", r["split"], f"{i:02d}-{r['method']}.json"),
                     typed(r))


def test_rendering_matches_checked_in_file(tmp_path):
    write_fixture(tmp_path / "results")
    rendered, skipped = render_all(str(tmp_path / "results"), str(tmp_path))
    assert not skipped
    text = rendered[0].text.replace(str(tmp_path / "results"), "RESULTS")
    with open(EXPECTED, encoding="utf-8") as f:
        assert text == f.read()


def test_best_is_bold_second_underlined_and_references_unranked(tmp_path):
    write_fixture(tmp_path / "results")
    text = render_all(str(tmp_path / "results"), str(tmp_path))[0][0].text
    assert "**99.00**" in text and "**88.00**" in text   # equal values share the mark
    assert "**100.00**" not in text          # the individual row is not ranked
    assert "_97.00_" in text and "<u>" not in text   # italics render in every viewer
    assert "**2.63**" in text                # lowest ADR bold
    # rows that differ only by seed: one row, mean ± standard deviation over the seeds
    assert "| Ties-Merging (mean ± sd, 2 seeds) | 71.00 ± 1.41 | 79.50 ± 0.71 | 75.25 ± 0.35 |" \
        in text
    assert "(seed 0)" not in text


def test_bad_files_are_reported_by_name_and_skipped(tmp_path):
    folder = tmp_path / "results"
    write_fixture(folder)
    (folder / "demo" / "seen" / "broken.json").write_text("{ not json")
    old = dict(FIXTURE[2], schema_version=SCHEMA_VERSION + 1)
    (folder / "demo" / "seen" / "future.json").write_text(json.dumps(old))
    records, skipped = read_records(str(folder))
    assert len(records) == len(FIXTURE)
    reasons = {os.path.basename(s.path): s.reason for s in skipped}
    assert "does not parse" in reasons["broken.json"]
    assert "schema version 2" in reasons["future.json"]


def test_interrupted_write_leaves_the_old_result_intact(tmp_path):
    path = str(tmp_path / "r.json")
    write_json_atomic(path, {"value": 1})

    class Explodes:
        """Serializes halfway, then fails, as a run killed mid-write would."""

    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": 2, "z": Explodes()})
    with open(path) as f:
        assert json.load(f) == {"value": 1}
    assert os.listdir(tmp_path) == ["r.json"]


REPORTED = {
    "suite": "demo", "source": "a paper",
    "tables": [{"table": "Table 4", "caption": "Table 4: demo.", "split": "seen",
                "tasks": ["t2", "t1"],
                "rows": [{"paper_name": "Individual", "method": "individual",
                          "tasks": {"t2": 91.0, "t1": 99.5}, "average": 95.25},
                         {"paper_name": "DTS-D", "method": "dts-d",
                          "tasks": {"t2": 87.0, "t1": 98.0}, "average": 92.5, "adr": 2.9,
                          "amr": 3.68},
                         {"paper_name": "WEMOE", "method": "wemoe",
                          "tasks": {"t2": 80.0, "t1": 90.0}, "average": 85.0}]},
               {"table": "Table 1", "caption": "Table 1: other tasks.", "split": "seen",
                "tasks": ["t1", "t2", "t9"], "rows": [{"paper_name": "DTS-D", "method": "dts-d",
                                                       "tasks": {"t1": 1.0}}]}],
}


def test_reported_rows_are_marked_and_compared_with_measured(tmp_path):
    write_fixture(tmp_path / "results")
    write_json_atomic(str(tmp_path / "reported" / "demo.json"), REPORTED)
    text = render_all(str(tmp_path / "results"), str(tmp_path), "demo",
                      reported_dir=str(tmp_path / "reported"))[0][0].text
    measured, reported = text.split("## Reported by the paper")
    assert "(reported)" not in measured                   # never mixed with measured rows
    assert "| DTS-D (reported)" in reported and "| WEMOE (reported)" in reported
    delta = reported.split("### Measured minus reported: seen split against Table 4")[1]
    # dts-d measured 88.00 / 97.00 (avg 92.50) against reported 87.0 / 98.0 (92.5)
    assert "| DTS-D " in delta and "+1.00" in delta and "-1.00" in delta and "+0.00" in delta
    assert "| Individual " in delta and "-1.00" in delta  # 90.0 - 91.0
    assert "against Table 1" not in reported               # other task set: no comparison


def test_reported_files_match_the_paper():
    """The checked-in figures are what scripts/extract_reported.py reads from the paper."""
    import sys

    paper = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "paper",
                         "dts-paper.txt")
    if not os.path.exists(paper):
        pytest.skip("the paper's text is not beside the project")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
    from extract_reported import extract

    with open(paper, encoding="utf-8") as f:
        extracted = extract(f.read())
    folder = os.path.join(os.path.dirname(__file__), "..", "..", "tasks", "reported")
    for suite, entry in extracted.items():
        with open(os.path.join(folder, f"{suite}.json"), encoding="utf-8") as f:
            assert json.load(f) == json.loads(json.dumps(entry))
    dts = next(r for r in extracted["vit-b32"]["tables"][0]["rows"] if r["method"] == "dts-d")
    assert dts["tasks"]["sun397"] == 74.15 and dts["amr"] == 3.68       # Table 1, as printed


def test_similarity_weighted_unseen_rows_are_labelled(tmp_path):
    weighted = record("emr", "emr", "unseen", {"t3": 0.5}, adr=37.5, amr=3.1)
    weighted["unseen_weighting"] = "similarity"
    own = record("emr", "emr", "unseen", {"t3": 0.3}, adr=62.5, amr=3.1)
    for i, r in enumerate([weighted, own]):
        write_record(str(tmp_path / "results" / "demo" / "unseen" / f"{i}.json"), typed(r))
    text = render_all(str(tmp_path / "results"), str(tmp_path))[0][0].text
    assert "| EMR-Merging + similarity weights " in text and "| EMR-Merging " in text
    assert "(seed 0)" not in text                 # two different rows, not two seeds


def test_a_merge_that_saw_data_is_marked(tmp_path):
    import dataclasses

    from harness.bench.leaderboard import _base_label
    from harness.bench.records import RunRecord

    plain = RunRecord("tiny", "seen", "regmean", "regmean")
    saw = dataclasses.replace(plain, merge_info={"data": {"split": "validation",
                                                          "examples": {"a": 256}}})
    assert _base_label(plain) == "RegMean" and _base_label(saw) == "RegMean ‡"

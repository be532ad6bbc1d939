"""The typed run record: its JSON round trip, its JSON Schema, and old records loading."""

import glob
import json
import os

import pytest

from harness.bench.records import (SCHEMA_PATH, AmrFigures, RecordError, RunRecord, TaskScore,
                                   read_outcomes, read_record, write_record)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKED_IN = sorted(glob.glob(os.path.join(ROOT, "leaderboards", "results", "*", "*", "*.json")))


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_checked_in_record_follows_the_schema_and_loads(validator):
    assert len(CHECKED_IN) > 50
    for path in CHECKED_IN:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        errors = [e.message for e in validator.iter_errors(data)]
        assert not errors, (path, errors[:3])
        record, problem = read_record(path)
        assert problem is None and record.path == path
        if record.outcomes:                   # its per-example outcomes are there and intact
            outcomes, why = read_outcomes(record)
            assert outcomes is not None, why


def measured() -> RunRecord:
    return RunRecord("tiny", "seen", "dts-d", "dts-d", 3, {"density": 0.3},
                     task_order=["b", "a"],
                     tasks={"b": TaskScore("accuracy", 0.5, {}, 10),
                            "a": TaskScore("mcc", 0.25, {"accuracy": 0.7}, 10)},
                     average=0.375, individual_average=0.5, adr=25.0,
                     amr=AmrFigures({"a": 1.0, "b": 2.0}, 1.5, 2.25),
                     stored_bytes_per_task={"a": 10, "b": 20}, merged_params=100,
                     merge_info={"density": 0.3}, gamma={}, merge_seconds=0.5,
                     eval_seconds=0.25, peak_rss_bytes=2**20, provenance={"device": "cpu"})


def test_a_record_round_trips_through_its_file_and_follows_the_schema(tmp_path, validator):
    record = measured()
    written = write_record(str(tmp_path / "r.json"), record)
    assert written.path == str(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert not list(validator.iter_errors(data))
    again, problem = read_record(str(tmp_path / "r.json"))
    assert problem is None and again == record and again.task_order == ["b", "a"]
    refused = RunRecord("tiny", "unseen", "svd", "svd", status="not-applicable", reason="no")
    assert not list(validator.iter_errors(refused.to_json()))
    assert RunRecord.from_json(refused.to_json()) == refused


def test_version_1_reference_records_load_as_references():
    old = {"schema_version": 1, "suite": "tiny", "split": "seen", "method": "individual",
           "label": "Individual", "hyperparameters": {}, "seed": 0, "adr": None, "amr": None,
           "tasks": {"a": {"metric": "accuracy", "value": 1.0}}, "average": 1.0}
    record = RunRecord.from_json(old)
    assert record.status == "reference" and record.task_order == ["a"]
    assert record.tasks["a"] == TaskScore("accuracy", 1.0)


@pytest.mark.parametrize("change, problem", [
    ({"status": "guessed"}, "status 'guessed'"),
    ({"split": "train"}, "neither seen nor unseen"),
    ({"tasks": {"a": {"metric": "accuracy"}}}, "task 'a'"),
    ({"task_order": ["zzz"]}, "task_order"),
    ({"seed": "1"}, "seed"),
])
def test_bad_records_say_what_is_wrong(change, problem):
    data = {**measured().to_json(), **change}
    with pytest.raises(RecordError, match=problem):
        RunRecord.from_json(data)


def test_a_record_names_the_commit_its_process_started_on(monkeypatch):
    """The commit is read once per process (when a run starts): a record written after a
    later commit still names the code that ran."""
    from harness.bench import provenance

    provenance.git_commit.cache_clear()
    first = provenance.git_commit()

    def no_git(*args, **kwargs):
        raise AssertionError("git read again")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert provenance.git_commit() == first
    provenance.git_commit.cache_clear()


def test_only_changes_to_the_code_mark_a_commit_dirty(tmp_path):
    """A leaderboard a sweep renders meanwhile is not a change to the code that ran."""
    import subprocess

    from harness.bench.provenance import code_changed

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)
    for path in ("harness/bench/x.py", "tasks/t.py", "leaderboards/board.md", "README.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    (tmp_path / "leaderboards/board.md").write_text("b\n")
    (tmp_path / "README.md").write_text("b\n")
    (tmp_path / "new.py").write_text("untracked\n")
    assert not code_changed(str(tmp_path / "harness"))
    (tmp_path / "tasks/t.py").write_text("b\n")
    assert code_changed(str(tmp_path / "harness"))

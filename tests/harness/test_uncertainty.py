"""Bootstrap intervals over test examples and paired comparisons (harness.bench.uncertainty,
harness.bench.analysis, harness compare)."""

import json
import os

import numpy
import pytest
import torch

from harness.bench.analysis import ComparisonError, compare, find_row, load
from harness.bench.records import RunRecord, TaskScore, read_outcomes, read_record, write_record
from harness.bench.references import with_intervals
from harness.bench.uncertainty import (RESAMPLES, interval, p_value, paired, resample_indices,
                                       row_replicates, task_replicates)
from harness.core.metrics import matthews_correlation


def test_resamples_are_fixed_per_task_and_size_so_rows_are_paired():
    a, b = resample_indices("cola", 50), resample_indices("cola", 50)
    assert a.shape == (RESAMPLES, 50) and (a == b).all()
    assert not (resample_indices("sst2", 50) == a).all()
    assert a.min() >= 0 and a.max() < 50


def test_accuracy_replicates_are_means_of_the_resampled_examples():
    correct = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.uint8)
    replicates = task_replicates("t", "accuracy", {"score": correct})
    rows = resample_indices("t", 8)
    assert numpy.allclose(replicates, correct.numpy()[rows].mean(axis=1))
    low, high = interval(replicates)
    assert low <= 6 / 8 <= high


def test_metrics_that_are_not_means_are_recomputed_on_each_resample():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (60,), generator=g)
    predictions = torch.where(torch.rand(60, generator=g) < 0.8, labels, 1 - labels)
    outcomes = {"prediction": predictions, "reference": labels}
    replicates = task_replicates("cola", "mcc", outcomes)
    row = resample_indices("cola", 60)[7]
    assert replicates[7] == pytest.approx(matthews_correlation(predictions[row], labels[row]))


def test_a_constant_row_has_a_point_interval_and_identical_rows_do_not_differ():
    ones = {"t": {"score": torch.ones(20, dtype=torch.uint8)}}
    replicates = row_replicates({"t": "accuracy"}, ones)
    assert interval(replicates.average) == (1.0, 1.0)
    same = paired(1.0, 1.0, replicates.average, replicates.average)
    assert same.p_value == 1.0 and not same.significant


def test_a_clear_difference_is_significant_and_a_small_one_is_not():
    g = torch.Generator().manual_seed(1)
    base = (torch.rand(400, generator=g) < 0.7).to(torch.uint8)
    better = base.clone()
    better[base == 0] = 1                    # every wrong answer fixed: +30 points
    nudged = base.clone()
    nudged[(base == 0).nonzero()[:2]] = 1    # two examples: +0.5 points
    r = {name: row_replicates({"t": "accuracy"}, {"t": {"score": x}}).average
         for name, x in (("base", base), ("better", better), ("nudged", nudged))}
    assert paired(1.0, 0.7, r["better"], r["base"]).significant
    small = paired(0.705, 0.7, r["nudged"], r["base"])
    assert not small.significant and small.low <= 0.005 <= small.high
    assert p_value(numpy.array([1.0, 2.0, -1.0, 3.0])) == 0.5


def _record(tmp_path, method, values, split="seen", suite="demo", outcomes=True, seed=0):
    """A record whose per-example outcomes give ``values`` (accuracy per task)."""
    per_example = {t: {"score": torch.tensor([1] * int(v * 100) + [0] * (100 - int(v * 100)),
                                             dtype=torch.uint8)} for t, v in values.items()}
    record = RunRecord(suite, split, method, method, seed, task_order=list(values),
                       tasks={t: TaskScore("accuracy", v, examples=100)
                              for t, v in values.items()},
                       average=sum(values.values()) / len(values), adr=1.0)
    with_intervals(record, per_example if outcomes else None)
    path = tmp_path / suite / split / f"{method}-{seed}.json"
    return write_record(str(path), record, per_example if outcomes else None)


def test_records_store_outcomes_and_intervals_that_compare_reads(tmp_path):
    a = _record(tmp_path, "dts-d", {"x": 0.9, "y": 0.8})
    b = _record(tmp_path, "ties", {"x": 0.7, "y": 0.79})
    assert a.tasks["x"].interval[0] <= 0.9 <= a.tasks["x"].interval[1]
    assert a.average_interval[0] <= a.average <= a.average_interval[1]
    assert (tmp_path / "demo" / "seen" / "dts-d-0.outcomes.safetensors").exists()
    again, _ = read_record(a.path)
    assert read_outcomes(again)[0]["x"]["score"].sum() == 90
    result = compare(a, b)
    assert result.rows["x"].significant and not result.rows["y"].significant
    assert result.rows["Avg"].difference == pytest.approx(0.105)
    frame = load(str(tmp_path), suite="demo")
    assert set(frame["task"]) == {"x", "y", "Avg", "ADR"} and frame["low"].notna().sum() == 6


def test_comparisons_refuse_other_suites_splits_test_sets_and_records_without_outcomes(
        tmp_path):
    a = _record(tmp_path, "dts-d", {"x": 0.9})
    with pytest.raises(ComparisonError, match="different suites"):
        compare(a, _record(tmp_path, "ties", {"x": 0.7}, suite="other"))
    with pytest.raises(ComparisonError, match="different splits"):
        compare(a, _record(tmp_path, "ties", {"x": 0.7}, split="unseen"))
    with pytest.raises(ComparisonError, match="different test sets"):
        compare(a, _record(tmp_path, "emr", {"z": 0.7}))
    old = _record(tmp_path, "svd", {"x": 0.8}, outcomes=False)
    assert old.tasks["x"].interval is None and old.average_interval is None
    with pytest.raises(ComparisonError, match="no per-example outcomes"):
        compare(a, old)
    with pytest.raises(ComparisonError, match="Did you mean 'dts-d'"):
        find_row("dts-dd", "demo", "seen", str(tmp_path))
    _record(tmp_path, "dts-d", {"x": 0.8}, seed=1)
    with pytest.raises(ComparisonError, match="names 2 rows"):
        find_row("dts-d", "demo", "seen", str(tmp_path))


def test_a_tampered_outcomes_file_is_not_used(tmp_path):
    a = _record(tmp_path, "dts-d", {"x": 0.9})
    path = tmp_path / "demo" / "seen" / "dts-d-0.outcomes.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    outcomes, why = read_outcomes(read_record(a.path)[0])
    assert outcomes is None and "checksum" in why


def test_the_leaderboard_shows_intervals_and_marks_rows_close_to_the_best(tmp_path):
    from harness.bench.leaderboard import render_all

    _record(tmp_path, "dts-d", {"x": 0.9, "y": 0.8})
    _record(tmp_path, "ties", {"x": 0.7, "y": 0.79})
    _record(tmp_path, "svd", {"x": 0.5, "y": 0.5}, outcomes=False)
    text = render_all(str(tmp_path), str(tmp_path / "out"))[0][0].text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and "Method" not in line}
    assert "**90.00 ± " in rows["DTS-D"] and "79.00 ± " in rows["Ties-Merging"]
    assert rows["Ties-Merging"].count("†") == 1    # y: within noise of the best; x: not
    assert "50.00 |" in rows["SVD"] and "±" not in rows["SVD"].split("|")[1:3][1]


def test_cli_compare_prints_the_differences(tmp_path, capsys):
    from harness.bench.cli import main

    _record(tmp_path, "dts-d", {"x": 0.9, "y": 0.8})
    _record(tmp_path, "ties", {"x": 0.7, "y": 0.79})
    code = main(["compare", "--suite", "demo", "--results", str(tmp_path), "dts-d", "ties"])
    out = capsys.readouterr().out
    assert code == 0 and "+20.00" in out and "| Avg" in out
    code = main(["compare", "--suite", "demo", "--results", str(tmp_path), "dts-d", "nope"])
    assert code == 2 and "no row 'nope'" in capsys.readouterr().err
    assert json.load(open(tmp_path / "demo" / "seen" / "ties-0.json"))["outcomes"]["file"] \
        == "ties-0.outcomes.safetensors"
    assert os.path.exists(tmp_path / "demo" / "seen" / "ties-0.outcomes.safetensors")

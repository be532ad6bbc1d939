"""``--finetune-seed``: another fine-tuning of a building suite's task models, its own cache,
records and reference rows, and the leaderboard's spread between fine-tunings."""

import os

import pytest

from harness.bench.analysis import find_row, individual_row
from harness.bench.cli import main
from harness.bench.leaderboard import display_label, render_all
from harness.bench.lookup import get_suite
from harness.bench.records import read_records
from harness.tasks.tiny import TinySuite


@pytest.fixture(scope="module")
def seed1_cache(tiny_cache):
    """``tiny_cache`` with fine-tuning seed 1 built beside seed 0."""
    TinySuite(tiny_cache, finetune_seed=1).prepare(progress=False)
    return tiny_cache


def test_another_seed_fine_tunes_other_task_models_from_the_same_backbone(seed1_cache):
    published, other = TinySuite(seed1_cache), TinySuite(seed1_cache, finetune_seed=1)
    assert published.cache_folder() == os.path.join(seed1_cache, "tiny")
    assert other.cache_folder() == os.path.join(seed1_cache, "tiny-finetune-seed-1")
    assert published.identity() == {} and other.identity() == {"finetune_seed": 1}
    assert "finetune_seed" not in published.recipe          # seed 0 keeps its cache key
    checkpoints = [s.provenance()["checkpoints"] for s in (published, other)]
    assert checkpoints[0]["pretrained"] == checkpoints[1]["pretrained"]
    for task in published.split_tasks("seen"):
        assert checkpoints[0][f"task-{task}"] != checkpoints[1][f"task-{task}"]


def test_seed_zero_is_the_published_suite():
    assert TinySuite(finetune_seed=0).training_seed(111) == 111
    assert TinySuite(finetune_seed=2).training_seed(111) == 111 + 2 * 1_000_003


@pytest.mark.parametrize("bad", [-1, 1001, 1.5, "1", True])
def test_bad_finetune_seeds_are_refused(bad):
    with pytest.raises(ValueError, match="--finetune-seed"):
        TinySuite(finetune_seed=bad)


def test_suites_that_build_nothing_refuse_a_finetune_seed():
    with pytest.raises(ValueError, match="vit-b32.*--finetune-seed.*fine-tunes no task"):
        get_suite("vit-b32", finetune_seed=1)
    assert get_suite("vit-b32", finetune_seed=0).identity() == {}


def test_cli_refuses_a_negative_finetune_seed(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--method", "ties", "--suite", "tiny", "--finetune-seed", "-1"])
    assert "--finetune-seed" in capsys.readouterr().err


def test_runs_on_two_fine_tunings_keep_their_own_records_and_references(
        seed1_cache, tmp_path, capsys):
    results = str(tmp_path / "results")
    base = ["run", "--suite", "tiny", "--results", results, "--cache-dir", seed1_cache,
            "--quiet"]
    for method in ("task-arithmetic", "ties"):
        assert main([*base, "--method", method]) == 0
        assert main([*base, "--method", method, "--finetune-seed", "1"]) == 0
    capsys.readouterr()
    records = read_records(os.path.join(results, "tiny"))[0]
    individual = {r.finetune_seed: r for r in records
                  if r.method == "individual" and r.split == "seen"}
    assert set(individual) == {0, 1}                    # neither overwrote the other
    assert individual[1].suite_options == {"finetune_seed": 1}
    assert individual[0].suite_fingerprint != individual[1].suite_fingerprint   # other models
    for method in ("task-arithmetic", "ties"):
        rows = {r.finetune_seed: r for r in records if r.method == method}
        assert set(rows) == {0, 1}
        # each ADR is against its own fine-tuning's individual models
        for seed, row in rows.items():
            assert row.individual_average == individual[seed].average
        assert rows[0].path != rows[1].path

    # labels name rows of one fine-tuning; individual rows match the record's
    row = find_row("ties", "tiny", "seen", results, finetune_seed=1)
    assert row.finetune_seed == 1
    assert individual_row(row, results).finetune_seed == 1
    assert main(["compare", "--suite", "tiny", "--results", results, "ties", "ties",
                 "--b-finetune-seed", "1"]) == 0
    assert f"{row.label} minus {row.label}" in capsys.readouterr().out

    rendered, _ = render_all(results, str(tmp_path / "out"), "tiny")
    board = rendered[0].text
    main_table = board.split("## Other fine-tunings")[0]
    shown = display_label(row.method, row.label)
    assert main_table.count(f"| {shown} ") == 1          # seed 1's rows stay out of it
    assert "### Fine-tuning seed 1: seen tasks" in board
    spread = board.split("### Spread between fine-tunings")[1].split("## Runs")[0]
    for method in ("individual", "task-arithmetic", "ties"):
        label = next(display_label(r.method, r.label) for r in records if r.method == method)
        line = next(l for l in spread.splitlines() if f"| {label} " in l)
        assert line.count("±") == (1 if method == "individual" else 2)   # Avg; ADR
    assert "0, fine-tuning 1" in board                   # the runs table says which

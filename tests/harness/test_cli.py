"""End to end through the ``harness`` command on the ``tiny`` suite."""

import os
import shutil
import subprocess
import sys

import pytest

from harness import list_methods
from harness.bench.cli import main
from harness.bench.records import read_records
from harness.bench.unseen import similarity_weights
from harness.tasks.tiny import TinySuite
from tests.conftest import install_plugin

METHODS = sorted(list_methods())


def run_cli(capsys, *argv):
    argv = list(argv)
    if argv[0] in ("run", "validate") and "--suite" not in argv:
        argv += ["--suite", "tiny"]
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return str(tmp_path_factory.mktemp("results"))


def record_for(results, split, method):
    """The record of ``method`` at its default hyperparameters (the only one, or the one
    labelled by the bare name)."""
    records, _ = read_records(os.path.join(results, "tiny", split))
    found = [r for r in records if r.method == method]
    if len(found) > 1:
        found = [r for r in found if r.label == method]
    assert len(found) == 1, [r.path for r in found]
    return found[0]


@pytest.mark.parametrize("method", METHODS)
def test_run_every_method(method, results, tiny_cache, capsys):
    args = ("run", "--method", method, "--results", results, "--cache-dir", tiny_cache, "--quiet")
    if method == "svd":   # on tiny, DTS-T's budget leaves the baseline rank 0: it says so
        with pytest.warns(UserWarning, match="rank 0 for every matrix"):
            code, out, err = run_cli(capsys, *args)
    else:
        code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "ADR" in out and "AMR" in out
    record = record_for(results, "seen", method)
    suite = TinySuite(tiny_cache)
    assert record.to_json()["schema_version"] == 1
    assert record.method == method and record.split == "seen"
    assert record.task_order == suite.split_tasks("seen")
    individual = record_for(results, "seen", "individual")
    ind_avg = sum(t.value for t in individual.tasks.values()) / 6
    avg = sum(t.value for t in record.tasks.values()) / 6
    assert record.average == pytest.approx(avg)
    assert record.adr == pytest.approx(100 * (ind_avg - avg) / ind_avg)
    assert set(record.amr.per_task) == set(record.task_order)
    for key in ("merge_seconds", "eval_seconds", "peak_rss_bytes", "provenance"):
        assert getattr(record, key) is not None
    assert record.provenance["versions"]["torch"]
    assert record.provenance["suite"]["recipe"]["tasks"]


def test_reference_rows_and_gap(results, tiny_cache, capsys):
    run_cli(capsys, "run", "--method", "task-arithmetic", "--results", results,
            "--cache-dir", tiny_cache, "--quiet")
    pretrained = record_for(results, "seen", "pretrained")
    individual = record_for(results, "seen", "individual")
    for task, score in individual.tasks.items():
        assert score.value > pretrained.tasks[task].value + 0.05
    assert record_for(results, "seen", "task-arithmetic").adr > 5


def test_personalized_methods_beat_shared_ones(results, tiny_cache, capsys):
    for method in ("ties", "dts-d"):
        run_cli(capsys, "run", "--method", method, "--results", results, "--cache-dir",
                tiny_cache, "--quiet")
    assert record_for(results, "seen", "dts-d").adr < record_for(results, "seen", "ties").adr


def test_unseen_split_weights_by_similarity(results, tiny_cache, capsys):
    code, out, err = run_cli(capsys, "run", "--method", "dts-d", "--split", "unseen",
                             "--results", results, "--cache-dir", tiny_cache, "--quiet")
    assert code == 0, err
    assert "gamma for a-vs-c" in out
    record = record_for(results, "unseen", "dts-d")
    suite = TinySuite(tiny_cache)
    seen = suite.split_tasks("seen")
    expected = similarity_weights(suite.task_embedding("e-vs-g"),
                                  {t: suite.task_embedding(t) for t in seen})
    assert record.gamma["e-vs-g"] == pytest.approx(expected)
    assert record.gamma["e-vs-g"]["e-vs-f"] == pytest.approx(0.5)
    assert list(record.tasks) == ["a-vs-c", "e-vs-g"]


@pytest.mark.parametrize("method", ["weight-averaging", "emr", "t-switch", "tall-mask"])
def test_unseen_split_for_other_methods(method, results, tiny_cache, capsys):
    code, _, err = run_cli(capsys, "run", "--method", method, "--split", "unseen",
                           "--results", results, "--cache-dir", tiny_cache, "--quiet")
    assert code == 0, err
    record = record_for(results, "unseen", method)
    assert record.gamma == {}
    if method == "t-switch":   # the pretrained model
        pretrained = record_for(results, "unseen", "pretrained")
        assert record.tasks == pretrained.tasks


def test_existing_result_is_skipped_unless_forced(results, tiny_cache, capsys):
    args = ["run", "--method", "ties", "--results", results, "--cache-dir", tiny_cache]
    run_cli(capsys, *args, "--quiet")
    path = os.path.join(results, "tiny", "seen")
    before = {f: os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)}
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "skipped" in err
    after = {f: os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)}
    assert before == after
    code, _, _ = run_cli(capsys, *args, "--force", "--quiet")
    ties = [f for f in os.listdir(path) if f.startswith("ties-")][0]
    individual = [f for f in os.listdir(path) if f.startswith("individual-")][0]
    assert os.path.getmtime(os.path.join(path, ties)) > before[ties]
    assert os.path.getmtime(os.path.join(path, individual)) == before[individual]   # kept
    code, _, err = run_cli(capsys, *args, "--force", "--force-references")
    assert code == 0 and "again (--force-references)" in err
    assert os.path.getmtime(os.path.join(path, individual)) > before[individual]


def test_hyperparameters_make_separate_labelled_rows(results, tiny_cache, capsys):
    run_cli(capsys, "run", "--method", "dts-t", "--set", "density=0.1", "--results", results,
            "--cache-dir", tiny_cache, "--quiet")
    run_cli(capsys, "run", "--method", "dts-t", "--results", results, "--cache-dir",
            tiny_cache, "--quiet")
    files = [f for f in os.listdir(os.path.join(results, "tiny", "seen")) if f.startswith("dts-t-")
             and "star" not in f and f.endswith(".json")]
    assert len(files) == 2
    out_dir = os.path.join(results, "md")
    code, _, _ = run_cli(capsys, "leaderboard", "--results", results, "--out", out_dir)
    text = open(os.path.join(out_dir, "tiny.md")).read()
    assert "| DTS-T (density=0.1) " in text and "| DTS-T " in text


def test_leaderboard_check(results, tiny_cache, capsys):
    run_cli(capsys, "run", "--method", "emr", "--results", results, "--cache-dir", tiny_cache,
            "--quiet")
    out_dir = os.path.join(results, "md-check")
    assert run_cli(capsys, "leaderboard", "--results", results, "--out", out_dir)[0] == 0
    assert run_cli(capsys, "leaderboard", "--results", results, "--out", out_dir, "--check")[0] == 0
    path = os.path.join(out_dir, "tiny.md")
    with open(path, "a") as f:
        f.write("edited by hand\n")
    code, _, err = run_cli(capsys, "leaderboard", "--results", results, "--out", out_dir, "--check")
    assert code == 1 and "tiny.md" in err


@pytest.mark.parametrize("argv,message", [
    (["run", "--method", "dts_d"], "unknown method 'dts_d'. Did you mean 'dts-d'"),
    (["run", "--method", "dts-d", "--set", "densty=0.3"], "no hyperparameter 'densty'"),
    (["run", "--method", "dts-d", "--set", "density=2"], "'density' must be in [0, 1]"),
    (["run", "--method", "dts-d", "--set", "density"], "--set takes name=value"),
    (["run", "--method", "ties", "--suite", "tinny"], "unknown suite 'tinny'. Did you mean 'tiny'"),
    (["validate", "--method", "ties", "--device", "cuda"], "no CUDA device"),
])
def test_bad_input_fails_fast_with_a_message(argv, message, tmp_path, capsys):
    if "cuda" in argv:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    code, _, err = run_cli(capsys, *argv, "--results", str(tmp_path), "--cache-dir",
                           str(tmp_path / "cache"))
    assert code == 2
    assert message in err
    assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["cache"] and \
        not os.listdir(tmp_path / "cache")


def test_validate_and_ls(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "validate", "--method", "dts-d*", "--cache-dir", str(tmp_path))
    assert code == 0 and "dts-d-star" in out
    code, out, _ = run_cli(capsys, "ls", "methods")
    assert "dts-d  [personalized]" in out and "density: float = 0.3" in out
    code, out, _ = run_cli(capsys, "ls", "suites")
    assert "tiny" in out and "unseen: a-vs-c, e-vs-g" in out


SUITE_PLUGIN = '''
from harness.tasks.tiny import TinySuite


class PluginSuite(TinySuite):
    """The tiny suite under another name, served by a plugin."""

    name = "tiny-plugin"
'''


def test_plugin_suite_through_entry_point(tmp_path, tiny_cache):
    site = install_plugin(tmp_path, "mh_suite_plugin", SUITE_PLUGIN, {
        "merge_harness.suites": {"tiny-plugin": "mh_suite_plugin:PluginSuite"}})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.getcwd()]))
    cmd = [sys.executable, "-m", "harness.bench.cli", "run", "--method", "ties", "--suite",
           "tiny-plugin", "--results", str(tmp_path / "results"), "--cache-dir", tiny_cache,
           "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ties on tiny-plugin" in out.stdout
    assert os.listdir(tmp_path / "results" / "tiny-plugin" / "seen")


UNDESCRIBED_PLUGIN = '''
import dataclasses

from harness.tasks.tiny import TinySuite


class UndescribedSuite(TinySuite):
    """The tiny suite with one unseen task lacking a description."""

    name = "tiny-undescribed"
    tasks = tuple(dataclasses.replace(t, description="") if t.name == "e-vs-g" else t
                  for t in TinySuite.tasks)
'''


def test_unseen_task_without_description_is_an_error(tmp_path, tiny_cache):
    site = install_plugin(tmp_path, "mh_undescribed", UNDESCRIBED_PLUGIN, {
        "merge_harness.suites": {"tiny-undescribed": "mh_undescribed:UndescribedSuite"}})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.getcwd()]))
    cmd = [sys.executable, "-m", "harness.bench.cli", "run", "--method", "dts-t", "--suite",
           "tiny-undescribed", "--split", "unseen", "--results", str(tmp_path / "results"),
           "--cache-dir", tiny_cache, "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "'e-vs-g' of suite 'tiny-undescribed' has none" in out.stderr


def test_method_that_cannot_apply_is_recorded_and_listed(tiny_cache, tmp_path, capsys):
    """A method whose own rule cannot be met (DTS-D* on a model of convolutions) stops with a
    message, writes a not-applicable record, and the leaderboard lists it under the table."""
    from dataclasses import dataclass

    from harness.engine.method import MergeMethod
    from harness.core.errors import MethodNotApplicable
    from harness.core.registry import METHODS as REGISTRY

    @dataclass(frozen=True)
    class NeverFits(MergeMethod):
        name = "never-fits"

        def merge(self, pretrained, finetuned, *, progress=False):
            raise MethodNotApplicable("never-fits: the budget is below what must be stored")

    REGISTRY.register("never-fits", NeverFits)
    try:
        check_not_applicable(tiny_cache, tmp_path, capsys)
    finally:
        REGISTRY._targets.pop("never-fits")


def check_not_applicable(tiny_cache, tmp_path, capsys):
    results = str(tmp_path / "results")
    args = ("run", "--method", "never-fits", "--results", results, "--cache-dir", tiny_cache,
            "--quiet")
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "budget is below" in err
    (record,) = [r for r in read_records(results)[0] if r.method == "never-fits"]
    assert record.status == "not-applicable" and record.tasks == {}
    code, _, err = run_cli(capsys, *args)             # asked again: same answer, no rerun
    assert code == 2 and "recorded in" in err
    out = tmp_path / "boards"
    assert main(["leaderboard", "--results", results, "--out", str(out)]) == 0
    text = (out / "tiny.md").read_text()
    assert "- `never-fits`: never-fits: the budget is below what must be stored" in text
    assert "| never-fits" not in text.split("## Runs")[0]


def test_encoder_flag_is_refused_by_a_suite_without_embeddings_from_text(tiny_cache, capsys):
    code, _, err = run_cli(capsys, "validate", "--method", "dts-d", "--encoder", "x",
                           "--cache-dir", tiny_cache)
    assert code == 2 and "takes no --encoder" in err


def test_stream_dir_writes_shards_and_gives_the_same_scores(tiny_cache, tmp_path, capsys):
    common = ["run", "--method", "ties", "--cache-dir", tiny_cache, "--quiet", "--force"]
    assert run_cli(capsys, *common, "--results", str(tmp_path / "a"))[0] == 0
    code, _, err = run_cli(capsys, *common, "--results", str(tmp_path / "b"),
                           "--stream-dir", str(tmp_path / "shards"))
    assert code == 0, err
    a, b = (record_for(str(tmp_path / r), "seen", "ties") for r in ("a", "b"))
    assert a.tasks == b.tasks
    run_folder = tmp_path / "shards" / "tiny" / "seen" / os.path.basename(b.path)[:-5]
    assert os.listdir(run_folder) == ["merged"]
    assert os.path.exists(run_folder / "merged" / "model.safetensors.index.json")


def test_streamed_outputs_of_other_runs_are_never_replaced(tiny_cache, tmp_path, capsys):
    common = ["run", "--cache-dir", tiny_cache, "--quiet", "--results", str(tmp_path / "r"),
              "--stream-dir", str(tmp_path / "shards")]
    for method in (["--method", "ties"], ["--method", "ties", "--set", "lam=0.5"],
                   ["--method", "task-arithmetic"], ["--method", "ties", "--seed", "3"]):
        assert run_cli(capsys, *common, *method)[0] == 0
    seen = tmp_path / "shards" / "tiny" / "seen"
    runs = sorted(os.listdir(seen))
    assert len(runs) == 4 and all(os.listdir(seen / r) == ["merged"] for r in runs)
    # a folder where a rerun writes that the harness did not write is refused, not replaced
    records, _ = read_records(str(tmp_path / "r" / "tiny" / "seen"))
    first = next(os.path.basename(r.path)[:-5] for r in records
                 if r.label == "ties" and r.seed == 0)
    target = seen / first / "merged"
    shutil.rmtree(target)
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, *common, "--method", "ties", "--force")
    assert code == 2 and "not a folder of shards merge-harness wrote" in err, err
    assert (target / "notes.txt").read_text() == "mine"


def test_seeds_run_a_random_method_once_per_seed_and_others_once(tiny_cache, tmp_path, capsys):
    common = ["run", "--cache-dir", tiny_cache, "--results", str(tmp_path), "--quiet"]
    code, out, err = run_cli(capsys, *common, "--method", "dare", "--seeds", "0,1,2")
    assert code == 0 and "dare over seeds 0, 1, 2: Avg" in out and "(mean ± sd)" in out
    seeds = sorted(r.seed for r in read_records(str(tmp_path))[0] if r.method == "dare")
    assert seeds == [0, 1, 2]
    code, out, err = run_cli(capsys, *common, "--method", "ties", "--seeds", "3,4")
    assert code == 0 and "over seeds" not in out
    assert [r.seed for r in read_records(str(tmp_path))[0] if r.method == "ties"] == [3]
    with pytest.raises(SystemExit):
        run_cli(capsys, *common, "--method", "dare", "--seeds", "1,1")

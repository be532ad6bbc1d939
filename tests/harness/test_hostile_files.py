"""Hostile and broken files: nothing is deleted that the harness did not write, writes are atomic,
and every damaged input is an error naming its file (or a skip, or a rebuild), never a crash.
One section per defect of the issue; hostile pickles have a module of their own."""

import errno
import json
import multiprocessing
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from harness import HyperparameterError, MergeInputError, MergeResult, ResultFormatError, get_method
from harness.bench.cli import main
from harness.io.files import ReplaceRefusedError, WorkFolder, clean_leftovers, exchange
from harness.engine.storage import canonical_sha256
from harness.bench.records import read_records, record_path
from harness.io.lazy import LazyStateDict
from tests.conftest import make_models


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree(path) -> dict:
    """Every file under ``path`` with its bytes."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


# ---- 2. MergeResult.save deletes nothing it did not write ------------------------------------
@pytest.fixture(scope="module")
def personalized():
    pre, ft = make_models()
    return get_method("dts-t").merge(pre, ft)


def test_save_refuses_a_project_folder_a_file_and_a_symlink(tmp_path, personalized):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    (project / "data").mkdir()
    before = tree(project)
    with pytest.raises(ReplaceRefusedError, match="project exists and is not a stored merge"):
        personalized.save(project)
    assert tree(project) == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ReplaceRefusedError, match="notes.txt is a file"):
        personalized.save(notes)
    assert notes.read_text() == "mine"
    link = tmp_path / "link"
    link.symlink_to(project)
    with pytest.raises(ReplaceRefusedError, match="link is a symbolic link"):
        personalized.save(link)
    assert link.is_symlink() and tree(project) == before
    assert sorted(os.listdir(tmp_path)) == ["link", "notes.txt", "project"]   # no leftovers


def test_save_replaces_a_stored_result_but_not_one_holding_other_files(tmp_path, personalized):
    target = tmp_path / "result"
    get_method("ties").merge(*make_models()).save(target)
    personalized.save(target)
    assert MergeResult.load(target).method == "dts-t"
    (target / "my-notes.md").write_text("mine")
    with pytest.raises(ReplaceRefusedError, match="my-notes.md, which its manifest does not"):
        personalized.save(target)
    assert (target / "my-notes.md").read_text() == "mine"


def test_exchange_swaps_two_folders_atomically(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    if not exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("no atomic exchange on this OS or file system")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def _killed_save(target: str, stage: str) -> None:
    """Save a result in a child process that dies (os._exit) at ``stage``."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        import harness.io.files as files
        from harness import get_method
        from tests.conftest import make_models
        stage = {stage!r}
        if stage == "writing":
            import harness.engine.storage as storage
            storage.sha256_file = lambda path: os._exit(9)
        else:
            files.exchange = lambda a, b: False        # the fallback: two renames
            rename, calls = os.rename, []
            def dying(a, b):
                calls.append(a)
                if len(calls) == 2:
                    os._exit(9)                        # killed between the two renames
                return rename(a, b)
            os.rename = dying
        get_method("t-switch").merge(*make_models(seed=5)).save({target!r})
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == 9, child.stderr


def test_a_killed_save_leaves_the_old_result_and_its_leftovers_are_cleaned(tmp_path,
                                                                          personalized):
    target = tmp_path / "result"
    personalized.save(target)
    _killed_save(str(target), "writing")
    leftovers = [n for n in os.listdir(tmp_path) if n != "result"]
    assert leftovers and all(".tmp-result-" in n for n in leftovers)
    assert MergeResult.load(target).method == "dts-t"
    personalized.save(target)                  # the next write cleans what the dead run left
    assert os.listdir(tmp_path) == ["result"]


def test_a_save_killed_between_renames_is_put_back_on_the_next_open(tmp_path, personalized):
    target = tmp_path / "result"
    personalized.save(target)
    _killed_save(str(target), "renaming")
    assert not target.exists()                 # the window of the two-rename fallback
    assert MergeResult.load(target).method == "dts-t"      # recovered from the aside copy
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == ["result"]


def test_a_live_work_folder_is_never_cleaned(tmp_path):
    work = WorkFolder(str(tmp_path / "out"), "partial")
    (tmp_path / ".stranger.partial-0000").mkdir()          # no lock file: not ours
    assert clean_leftovers(str(tmp_path), "partial") == []
    assert os.path.isdir(work.path) and (tmp_path / ".stranger.partial-0000").is_dir()
    work.discard()


# ---- 4. leaderboards are written atomically; a missing results folder is an error -----------
def test_leaderboard_of_a_missing_results_folder_is_an_error(tmp_path, capsys):
    board = tmp_path / "boards" / "tiny.md"
    board.parent.mkdir()
    board.write_text("committed board\n")
    code, out, err = run_cli(capsys, "leaderboard", "--results", str(tmp_path / "typo"),
                             "--out", str(board.parent))
    assert code == 2 and "typo does not exist" in err
    assert board.read_text() == "committed board\n"


def test_a_full_disk_leaves_the_old_leaderboard_whole(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    path = record_path(str(results), "tiny", "seen", "ties", {}, 0)
    os.makedirs(os.path.dirname(path))
    json.dump({"schema_version": 1, "suite": "tiny", "split": "seen", "method": "ties",
               "label": "ties", "seed": 0, "tasks": {"a": {"metric": "accuracy", "value": 0.5}},
               "average": 0.5, "adr": 1.0, "amr": {"mean": 0.0}}, open(path, "w"))
    board = tmp_path / "boards" / "tiny.md"
    board.parent.mkdir()
    board.write_text("old board " * 2000)

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, "leaderboard", "--results", str(results), "--out",
                           str(board.parent), "--suite", "tiny")
    assert code == 2 and err.strip() == f"error: No space left on device: {board}"
    assert board.read_text() == "old board " * 2000
    assert os.listdir(board.parent) == ["tiny.md"]


# ---- 5. the result manifest is protected ------------------------------------------------------
def _rewrite(folder, change) -> None:
    """Edit a stored manifest as an attacker would: ``change(manifest)``, checksum recomputed."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if "manifest_sha256" in manifest:
        manifest["manifest_sha256"] = canonical_sha256(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["tasks"][0].update(file=m["tasks"][1]["file"])
     or m["tasks"][1].update(file="task-000.safetensors"), "files were swapped"),
    (lambda m: m.update(checksums={}), "files it uses"),
    (lambda m: m["tasks"][0].update(file="../elsewhere.safetensors"), "not a task-<n>"),
    (lambda m: m["tasks"][0].update(file="/etc/passwd"), "not a task-<n>"),
    (lambda m: m.update(format_version=0), "format_version 0"),
    (lambda m: m.update(format_version=-5), "format_version -5"),
    (lambda m: m.update(format_version=True), "format_version True"),
    (lambda m: m.update(merged_params="12"), "merged_params"),
    (lambda m: m.update(merged_params=0), "merged_params"),
    (lambda m: m.update(kind="other"), "kind"),
    (lambda m: m["tasks"][0]["records"][0].update(kind="pickle"), "no codec of kind .pickle."),
    (lambda m: m["tasks"][0]["records"][0]["meta"]["u"].update(shape=[99, 99]),
     "codec|does not|shape"),
    (lambda m: m.update(unseen={"shared": "../x"}), "unseen rule"),
    (lambda m: m.pop("info"), "fields missing"),
])
def test_a_crafted_manifest_is_refused_naming_the_file(tmp_path, personalized, change, message):
    folder = tmp_path / "r"
    personalized.save(folder)
    _rewrite(folder, change)
    with pytest.raises(ResultFormatError, match=message) as error:
        MergeResult.load(folder)
    assert str(folder) in str(error.value)


def test_a_manifest_changed_without_its_checksum_is_refused(tmp_path, personalized):
    folder = tmp_path / "r"
    personalized.save(folder)
    text = (folder / "manifest.json").read_text()
    digits = str(personalized.merged_params)
    (folder / "manifest.json").write_text(text.replace(digits, digits[:-1] + "7"))
    with pytest.raises(ResultFormatError, match="its own checksum"):
        MergeResult.load(folder)


def _same(a: MergeResult, b: MergeResult) -> bool:
    if (a.method, a.tasks, a.kind, a.merged_params, a.unseen, a.info, a.accounting,
            a.hyperparameters) != (b.method, b.tasks, b.kind, b.merged_params, b.unseen, b.info,
                                   b.accounting, b.hyperparameters):
        return False
    for task in a.tasks:
        x, y = a.weights_for(task), b.weights_for(task)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


@pytest.mark.parametrize("method", ["dts-t", "emr", "ties"])
def test_fuzzed_results_load_exactly_or_fail_naming_the_file(tmp_path, method):
    result = get_method(method).merge(*make_models())
    folder = tmp_path / "r"
    result.save(folder)
    originals = tree(folder)
    rng = random.Random(method)
    loaded = refused = 0
    for trial in range(160):
        name = "manifest.json" if trial % 2 else rng.choice(sorted(originals))
        data = bytearray(originals[name])
        if trial % 5 == 0:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.choice((1, 1, 3))):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (folder / name).write_bytes(bytes(data))
        try:
            again = MergeResult.load(folder)
        except ResultFormatError as error:
            assert name in str(error) or str(folder) in str(error)
            refused += 1
        else:
            assert _same(again, result), (name, trial)
            loaded += 1
        (folder / name).write_bytes(originals[name])
    assert refused > 140


# ---- 6. non-finite hyperparameters and overflow ---------------------------------------------
@pytest.mark.parametrize("name, values", [("task-arithmetic", {"lam": "inf"}),
                                          ("ties", {"lam": "nan"}),
                                          ("tall-mask", {"lam": "-inf"}),
                                          ("dts-d-star", {"budget": "inf"}),
                                          ("dts-d", {"ties_lam": "inf"}),
                                          ("tall-mask", {"lam": {"a": float("inf")}})])
def test_non_finite_hyperparameters_are_refused(name, values):
    with pytest.raises(HyperparameterError, match="must be finite"):
        get_method(name, **values)


@pytest.mark.parametrize("name, values", [("task-arithmetic", {"lam": 1e308}),
                                          ("ties", {"lam": 1e308}), ("dare", {"lam": 1e308}),
                                          ("tall-mask", {"unseen_lam": 1e308}), ("emr", {})])
def test_an_overflowing_output_is_refused_naming_the_key(name, values):
    pre, ft = make_models()
    result = get_method(name, **values).merge(pre, ft)
    if name == "emr":
        result.shared["tau_uni"]["layer.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite values in .*key '"):
        result.check_finite()


@pytest.mark.parametrize("name", ["task-arithmetic", "ties", "dare", "emr", "tall-mask",
                                  "t-switch", "dts-t", "dts-d", "svd", "weight-averaging"])
def test_a_task_vector_that_overflows_float32_is_named(name):
    pre = {"w": torch.full((4, 4), -3e38), "b": torch.zeros(4)}
    ft = {"a": {"w": torch.full((4, 4), 3e38), "b": torch.ones(4)},
          "b": {"w": torch.full((4, 4), -3e38), "b": torch.ones(4)}}
    if name == "weight-averaging":              # averages weights, no task vector: finite
        get_method(name).merge(pre, ft).check_finite()
        return
    with pytest.raises(MergeInputError, match="key 'w'.*'a'.*overflows float32"):
        get_method(name, **({"density": 0.5} if name == "svd" else {})).merge(pre, ft)


def test_run_with_an_overflowing_lam_writes_no_record(tiny_cache, tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--method", "task-arithmetic", "--suite", "tiny",
                           "--set", "lam=1e308", "--cache-dir", tiny_cache, "--results",
                           str(tmp_path), "--quiet")
    assert code == 2 and "non-finite values in key" in err
    records, _ = read_records(str(tmp_path))
    assert not [r for r in records if r.method == "task-arithmetic"]
    code, _, err = run_cli(capsys, "run", "--method", "ties", "--suite", "tiny", "--set",
                           "lam=inf", "--cache-dir", tiny_cache, "--results", str(tmp_path))
    assert code == 2 and "must be finite" in err


# ---- 7. one bad file stops nothing -------------------------------------------------------------
def _good_record(**changes) -> dict:
    record = {"schema_version": 1, "suite": "tiny", "split": "seen", "method": "ties",
              "label": "ties", "seed": 0, "tasks": {"a": {"metric": "accuracy", "value": 0.5}},
              "average": 0.5, "adr": 1.0, "amr": {"mean": 0.0}}
    return {**record, **changes}


def test_bad_records_are_skipped_naming_each_file(tmp_path, capsys):
    folder = tmp_path / "results" / "tiny" / "seen"
    folder.mkdir(parents=True)
    (folder / "good.json").write_text(json.dumps(_good_record()))
    (folder / "latin1.json").write_bytes(b'{"suite": "caf\xe9"}')
    (folder / "digits.json").write_text('{"seed": ' + "9" * 5000 + "}")
    (folder / "missing.json").write_text(json.dumps({"schema_version": 1, "suite": "tiny"}))
    (folder / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (folder / "list.json").write_text("[1, 2]")
    (folder / "badtask.json").write_text(json.dumps(_good_record(tasks={"a": 3})))
    records, skipped = read_records(str(tmp_path / "results"))
    assert [os.path.basename(r.path) for r in records] == ["good.json"]
    reasons = {os.path.basename(s.path): s.reason for s in skipped}
    assert set(reasons) == {"latin1.json", "digits.json", "missing.json", "deep.json",
                            "list.json", "badtask.json"}
    assert "not UTF-8" in reasons["latin1.json"] and "field 'split'" in reasons["missing.json"]
    code, out, err = run_cli(capsys, "leaderboard", "--results", str(tmp_path / "results"),
                             "--out", str(tmp_path / "boards"))
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 6 and all(line.startswith("skipped ") for line in lines)


def test_a_damaged_record_of_the_cell_being_run_is_run_again(tiny_cache, tmp_path, capsys):
    common = ["run", "--method", "task-arithmetic", "--suite", "tiny", "--cache-dir",
              tiny_cache, "--results", str(tmp_path)]
    assert run_cli(capsys, *common, "--quiet")[0] == 0
    records, _ = read_records(str(tmp_path))
    path = next(r.path for r in records if r.method == "task-arithmetic")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    code, out, err = run_cli(capsys, *common)
    assert code == 0 and "cannot be used" in err and "running again" in err
    assert json.load(open(path))["method"] == "task-arithmetic"


def test_a_non_utf8_cache_manifest_is_rebuilt(tmp_path):
    from harness.tasks.cache import CheckpointCache

    cache = CheckpointCache(str(tmp_path), {"r": 1})
    cache.put("a", {"w": torch.ones(2)})
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe not json")
    with pytest.warns(UserWarning, match="manifest.json is not UTF-8"):
        again = CheckpointCache(str(tmp_path), {"r": 1})
    assert not again.has("a")
    (tmp_path / "manifest.json").write_text('{"recipe": {"r": 1}, "entries": [1]}')
    with pytest.warns(UserWarning, match="not a cache manifest"):
        assert not CheckpointCache(str(tmp_path), {"r": 1}).has("a")


# ---- 8. errors before any work, one line each --------------------------------------------------
def test_unwritable_places_are_refused_before_any_work(tiny_cache, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for flag, value in (("--results", blocker), ("--results", blocker / "sub"),
                        ("--cache-dir", blocker / "cache"), ("--stream-dir", blocker)):
        args = ["run", "--method", "ties", "--suite", "tiny", "--cache-dir", tiny_cache,
                "--results", str(tmp_path / "r"), flag, str(value)]
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and flag in err and "is a file, not a folder" in err, err
    assert not (tmp_path / "r").exists()            # nothing was measured or written


def test_unwritable_folders_are_named(tmp_path, monkeypatch):
    from harness.io.files import UnwritablePlaceError, check_writable_folder

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr("tempfile.TemporaryFile", refuse)
    with pytest.raises(UnwritablePlaceError, match="--results .* not writable: Read-only"):
        check_writable_folder(str(tmp_path / "r"), "--results")


@pytest.mark.parametrize("argv, message", [
    (["--seed", str(2**70)], "--seed: must be in"),
    (["--seed", "-1"], "--seed: must be in"),
    (["--device", "meta"], "--device meta: merges and evaluation run on"),
    (["--device", "tpu"], "'tpu' is not a device"),
    (["--device", "gpu"], "'gpu' is not a device"),
])
def test_seeds_and_devices_are_checked_first(argv, message, tiny_cache, tmp_path, capsys):
    with pytest.raises(SystemExit) if argv[0] == "--seed" else _nothing():
        code, _, err = run_cli(capsys, "run", "--method", "ties", "--suite", "tiny",
                               "--cache-dir", tiny_cache, "--results", str(tmp_path), *argv)
        assert code == 2 and message in err
    if argv[0] == "--seed":
        assert message in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def roberta(top: str = 'pretrained = "./pretrained"', task: str = 'checkpoint = "./cola"\n'
            'data_files = "cola.parquet"') -> str:
    """A roberta-glue config: ``top`` lines before the tables, ``task`` inside [tasks.cola]."""
    return f'suite = "roberta-glue"\n{top}\n[tasks.cola]\n{task}\n'


ROBERTA = roberta()


@pytest.mark.parametrize("text, message", [
    ('suite = "roberta-glue"\npretrained = "./p"\n[tasks]\ncola = 1\n',
     "tasks.cola must be a table"),
    (roberta(top="pretrained = 7"), "pretrained must be a string, got 7"),
    (roberta(top='pretrained = "./p"\nunseen = "qqp"'), "unseen must be a list of strings"),
    (roberta(task="data_files = 3"), "tasks.cola.data_files"),
    (roberta(top='pretrained = "./p"\nbatch_size = -2'), "batch_size must be a positive"),
    (roberta(top='pretrained = "./p"\nmethod_defaults = 3'), "method_defaults must be a table"),
])
def test_suite_configs_of_wrong_types_are_refused(tmp_path, capsys, text, message):
    config = tmp_path / "config.toml"
    config.write_text(text)
    code, _, err = run_cli(capsys, "validate", "--method", "ties", "--suite", "roberta-glue",
                           "--suite-config", str(config), "--cache-dir", str(tmp_path))
    assert code == 2 and message in err and "config.toml" in err, err


def test_configs_that_are_not_regular_utf8_files_are_refused(tmp_path, capsys):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(ROBERTA.encode() + b'description = "caf\xe9"\n')
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path, message in ((latin, "not UTF-8"), ("/dev/zero", "not a regular file"),
                          (fifo, "not a regular file"), (tmp_path / "nope.toml", "does not exist")):
        code, _, err = run_cli(capsys, "validate", "--method", "ties", "--suite", "roberta-glue",
                               "--suite-config", str(path), "--cache-dir", str(tmp_path))
        assert code == 2 and message in err and str(path) in err, err


@pytest.mark.parametrize("index, message", [
    ("not json", "not valid JSON"), ('{"metadata": {}}', "no weight_map"),
    ('{"weight_map": {"w": "../../etc/passwd"}}', "not a file of the index's folder"),
    ('{"weight_map": []}', "no weight_map"),
])
def test_broken_shard_indexes_are_named(tmp_path, index, message):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(index)
    with pytest.raises(MergeInputError, match=message) as error:
        LazyStateDict(str(tmp_path))
    assert str(path) in str(error.value)


def test_a_full_disk_while_streaming_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys,
                                                                tiny_cache):
    import harness.io.shards as sharded

    def full(fd, offset, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sharded, "_write_at", full)
    code, _, err = run_cli(capsys, "run", "--method", "task-arithmetic", "--suite", "tiny",
                           "--cache-dir", tiny_cache, "--results", str(tmp_path / "r"),
                           "--stream-dir", str(tmp_path / "s"), "--quiet")
    assert code == 2
    assert err.startswith("error: No space left on device: ") and "shard-00001" in err
    assert len(err.strip().splitlines()) == 1


# ---- 9. one build per cache entry, however many processes ------------------------------------
def _build_entry(folder: str, log: str, name: str) -> None:
    import time

    from harness.tasks.cache import CheckpointCache

    def build():
        with open(log, "a") as f:
            f.write(f"{name}\n")
        time.sleep(0.5)
        return {"w": torch.full((2,), float(len(name)))}
    CheckpointCache(folder, {"recipe": 1}).ensure(name, build)


def test_concurrent_first_builds_build_each_entry_once(tmp_path):
    log = tmp_path / "builds.log"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_build_entry, args=(str(tmp_path / "c"), str(log), name))
               for name in ("a", "a", "a", "bb")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert sorted(log.read_text().split()) == ["a", "bb"]
    from harness.tasks.cache import CheckpointCache

    cache = CheckpointCache(str(tmp_path / "c"), {"recipe": 1})
    assert cache.has("a") and cache.has("bb")          # both entries in the merged manifest

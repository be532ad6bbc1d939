"""A new user's first hour: results kept per user, honest cold starts, fast and accurate help,
leaderboards from several folders with the paper's names, marks and a trade-off plot."""

import json
import os
import subprocess
import sys

import pytest

from harness.bench.cli import main
from harness.bench.leaderboard import render_all
from harness.bench.plot import Point, pareto_front
from harness.bench.records import read_record, read_records
from harness.core.defaults import default_results_dir


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- results live with the user ---------------------------------------------------------
def test_results_default_to_a_per_user_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MERGE_HARNESS_RESULTS", raising=False)
    monkeypatch.setenv("MERGE_HARNESS_CACHE", str(tmp_path / "cache"))
    assert default_results_dir() == str(tmp_path / "cache" / "leaderboards" / "results")
    monkeypatch.setenv("MERGE_HARNESS_RESULTS", str(tmp_path / "mine"))
    assert default_results_dir() == str(tmp_path / "mine")
    from harness.bench.runner import RunConfig
    assert RunConfig("ties").results_dir == str(tmp_path / "mine")


def test_a_run_writes_to_the_users_folder_and_leaderboard_beside_it(
        monkeypatch, tmp_path, tiny_cache, capsys):
    monkeypatch.setenv("MERGE_HARNESS_RESULTS", str(tmp_path / "boards" / "results"))
    code, _, _ = cli(capsys, "run", "--method", "task-arithmetic", "--suite", "tiny",
                     "--cache-dir", tiny_cache, "--quiet")
    assert code == 0
    assert read_records(str(tmp_path / "boards" / "results" / "tiny"))[0]
    code, out, _ = cli(capsys, "leaderboard", "--suite", "tiny")
    assert code == 0 and f"wrote {tmp_path / 'boards' / 'tiny.md'}" in out
    assert (tmp_path / "boards" / "tiny.md").exists()


def test_a_stored_record_of_other_models_is_run_again_saying_why(tmp_path, tiny_cache, capsys):
    results = str(tmp_path / "results")
    args = ("run", "--method", "ties", "--suite", "tiny", "--results", results,
            "--cache-dir", tiny_cache)
    assert cli(capsys, *args, "--quiet")[0] == 0
    path = next(r.path for r in read_records(os.path.join(results, "tiny"))[0]
                if r.method == "ties")
    code, _, err = cli(capsys, *args)
    assert code == 0 and "result exists, skipped" in err
    data = json.load(open(path))
    data["suite_fingerprint"] = "0123456789"              # measured on other task models
    json.dump(data, open(path, "w"))
    code, _, err = cli(capsys, *args)
    assert code == 0 and "measured on other models or data" in err and "running again" in err
    assert read_record(path)[0].suite_fingerprint != "0123456789"
    code, _, err = cli(capsys, *args, "--force")
    assert "--force: measuring ties again" in err and "stored scores are kept" in err


def test_a_leaderboard_reads_several_folders_the_first_winning(tmp_path, tiny_cache, capsys):
    mine, theirs = str(tmp_path / "mine"), str(tmp_path / "theirs")
    for folder, method in ((mine, "ties"), (theirs, "ties"), (theirs, "task-arithmetic")):
        assert cli(capsys, "run", "--method", method, "--suite", "tiny", "--results", folder,
                   "--cache-dir", tiny_cache, "--quiet")[0] == 0
    rendered, _ = render_all([mine, theirs], str(tmp_path / "out"), "tiny")
    board = rendered[0].text
    seen = board.split("## Unseen")[0]
    assert seen.count("| Ties-Merging ") == 1 and "| Task Arithmetic " in seen
    assert f"`{mine}/tiny` and `{theirs}/tiny`" in board


def test_reported_rows_come_with_the_suites_wherever_results_are(tmp_path, capsys):
    os.makedirs(tmp_path / "results")
    code, out, _ = cli(capsys, "leaderboard", "--results", str(tmp_path / "results"),
                       "--suite", "vit-b32")
    assert code == 0 and f"wrote {tmp_path / 'vit-b32.md'}" in out
    text = (tmp_path / "vit-b32.md").read_text()
    assert "| DTS-D\\* (reported)" in text                 # the paper's names, escaped
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("|")}
    assert "AdaMerging (reported)" in rows                 # implemented here (layer-wise)
    assert "Twin-Merging (reported) °" in rows             # not implemented here: marked
    assert "**" in text.split("### Table 1")[1].split("###")[0]   # marks recomputed
    assert "<u>" not in text
    assert "Task metric: accuracy" in text


def test_an_empty_results_folder_says_so(tmp_path, capsys):
    os.makedirs(tmp_path / "results")
    code, out, _ = cli(capsys, "leaderboard", "--results", str(tmp_path / "results"),
                       "--suite", "tiny")
    assert code == 0 and "No results yet" in (tmp_path / "tiny.md").read_text()


# ---- the trade-off plot -------------------------------------------------------------------
def test_the_pareto_front_keeps_only_undominated_rows():
    points = [Point("a", 0, 80), Point("b", 0, 85), Point("c", 3, 99), Point("d", 3.5, 98),
              Point("e", 6, 100), Point("f", 2, 70)]
    assert [p.label for p in pareto_front(points)] == ["b", "c", "e"]


def test_plots_are_written_embedded_and_deterministic(tmp_path, tiny_cache, capsys):
    pytest.importorskip("matplotlib")
    results = str(tmp_path / "results")
    for method in ("task-arithmetic", "dts-d"):
        assert cli(capsys, "run", "--method", method, "--suite", "tiny", "--results", results,
                   "--cache-dir", tiny_cache, "--quiet")[0] == 0
    out = tmp_path / "out"
    assert cli(capsys, "leaderboard", "--results", results, "--out", str(out),
               "--suite", "tiny")[0] == 0
    svg = (out / "tiny-seen.svg").read_text()
    assert svg.startswith("<?xml") and "DTS-D" in svg and "Pareto front" in svg
    assert "![tiny, seen tasks" in (out / "tiny.md").read_text()
    code, out_text, _ = cli(capsys, "leaderboard", "--results", results, "--out", str(out),
                            "--suite", "tiny", "--check")
    assert code == 0                                   # the same bytes on a second render
    (out / "tiny-seen.svg").write_text(svg.replace("DTS-D", "XXX"))
    code, _, err = cli(capsys, "leaderboard", "--results", results, "--out", str(out),
                       "--suite", "tiny", "--check")
    assert code == 1 and "tiny-seen.svg" in err


# ---- cold starts and help -----------------------------------------------------------------
def test_validate_says_what_the_first_run_downloads_and_builds(tmp_path, capsys):
    code, out, _ = cli(capsys, "validate", "--method", "dts-d", "--suite", "offline-text",
                       "--cache-dir", str(tmp_path), "--no-network-check")
    if code != 0:
        pytest.skip("the MiniLM backbone package is not installed")
    assert "the first run will" in out and "358 MB" in out and "fine-tune 8 task model" in out
    assert "downloads come from" not in out
    code, out, _ = cli(capsys, "validate", "--method", "ties", "--suite", "tiny",
                       "--cache-dir", str(tmp_path))
    assert code == 0 and "build 9 tiny model(s)" in out


def test_validate_checks_that_the_download_sources_answer(tmp_path, capsys, monkeypatch):
    from harness.bench import reachability

    probed = []
    monkeypatch.setattr(reachability, "probe", lambda url: probed.append(url) or (
        None if "good" in url else "URLError: [Errno -2] Name or service not known"))
    monkeypatch.delenv("PIP_NO_INDEX")
    argv = ["validate", "--method", "ties", "--suite", "offline-text", "--cache-dir",
            str(tmp_path)]
    monkeypatch.setenv("PIP_INDEX_URL", "https://good.example/simple")
    code, out, _ = cli(capsys, *argv)
    if code != 0 and "reachable" not in out:
        pytest.skip("the MiniLM backbone package is not installed")
    assert code == 0 and probed == ["https://good.example/simple/bigbench/"]
    assert "bigbench==1.0.0 from the package index (https://good.example/simple/bigbench/): " \
           "reachable" in out
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.invalid/simple/")
    code, out, err = cli(capsys, *argv)
    assert code == 1 and "NOT reachable: URLError" in out and "cannot be reached" in err
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    code, out, _ = cli(capsys, *argv)
    assert code == 1 and "PIP_NO_INDEX is set" in out and len(probed) == 2
    code, out, _ = cli(capsys, *argv, "--no-network-check")
    assert code == 0 and "downloads come from" not in out


def test_probe_tells_an_answer_from_no_answer(monkeypatch):
    import urllib.error

    from harness.bench import reachability

    def answer(exc):
        def urlopen(request, timeout):
            raise exc
        return urlopen

    monkeypatch.setattr(reachability.urllib.request, "urlopen", answer(
        urllib.error.HTTPError("https://x/", 404, "Not Found", {}, None)))
    assert reachability.probe("https://x/") is None
    monkeypatch.setattr(reachability.urllib.request, "urlopen", answer(
        urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))))
    assert reachability.probe("https://x/") == \
        "ConnectionRefusedError: [Errno 111] Connection refused"


def test_validate_lists_every_missing_checkpoint_and_dataset_at_once(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = cli(capsys, "validate", "--method", "ties", "--suite", "roberta-glue",
                       "--cache-dir", str(tmp_path))
    assert code == 2
    assert "problems:" in err and err.count("not in the local Hugging Face cache") >= 2
    assert "hf download" in err


def test_help_and_the_parser_do_not_import_torch():
    code = ("import sys; from harness.bench.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_ls_methods_shows_a_suites_defaults_and_plain_summaries(capsys):
    code, out, _ = cli(capsys, "ls", "methods", "--suite", "offline-text")
    assert code == 0
    assert "ties_merge_function: 'sum' | 'mean' = 'mean' *" in out     # the suite's value
    assert "``" not in out
    assert "lam: float | dict[str, float] = 0.4" in out
    dts = next(line for line in out.splitlines() if line.startswith("dts-d "))
    assert dts.endswith("reconstructs theta_t.")                       # a whole paragraph
    code, out, _ = cli(capsys, "ls", "methods")
    assert "ties_merge_function: 'sum' | 'mean' = 'sum'  " in out


def test_devices_are_checked_before_any_work(capsys):
    code, _, err = cli(capsys, "validate", "--method", "ties", "--suite", "tiny",
                       "--device", "gpu")
    assert code == 2 and "--device 'gpu' is not a device" in err


def test_progress_in_a_log_is_a_line_per_item_not_a_bar(capsys):
    from harness.core.progress import progress

    assert list(progress(["a", "b"], "building", lines=True)) == ["a", "b"]
    err = capsys.readouterr().err                     # pytest's stderr is not a terminal
    assert err.count("\n") == 2 and "building: a done (1/2" in err and "\r" not in err
    assert list(progress(range(3), "steps")) == [0, 1, 2]            # inner loops: silent
    assert list(progress(["x"], "off", enabled=False, lines=True)) == ["x"]
    assert capsys.readouterr().err == ""

"""``harness ls`` from its cached catalog: the same listing as from the classes, without torch
once cached, rebuilt when a source changes, and never writing over a file it did not make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

from harness.bench import catalog
from harness.bench.cli import main


def ls_output(capsys, *argv) -> str:
    assert main(["ls", *argv]) == 0
    return capsys.readouterr().out


def test_cached_listing_matches_the_classes(tmp_path):
    built = catalog.build()
    first = catalog.load(str(tmp_path))                 # builds and stores
    assert os.path.isfile(catalog.path_in(str(tmp_path)))
    again = catalog.load(str(tmp_path))                 # reads the stored one
    assert asdict(first) == asdict(built) == asdict(again)
    ties = next(m for m in again.methods if m.name == "ties")
    assert ties.title == "Ties-Merging" and "``" not in ties.summary
    assert ties.applied["offline-text"]["merge_function"] == "'mean'"
    assert [s.name for s in again.suites][:1] and any(s.unseen for s in again.suites)


def test_cached_listing_does_not_import_torch(tmp_path):
    catalog.load(str(tmp_path))
    code = ("import sys; from harness.bench.cli import main; "
            "main(['ls', 'methods', '--suite', 'offline-text']); main(['ls', 'suites']); "
            "print('torch imported:', 'torch' in sys.modules)")
    env = {**os.environ, "MERGE_HARNESS_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.rstrip().endswith("torch imported: False")
    assert "merge_function: 'sum' | 'mean' = 'mean' *" in out


def test_ls_prints_the_same_cached_or_not(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_HARNESS_CACHE", str(tmp_path))
    outputs = [(ls_output(capsys, "methods", "--suite", "offline-text"),
                ls_output(capsys, "suites")) for _ in range(2)]
    assert outputs[0] == outputs[1]
    assert "defaults as suite 'offline-text' applies them" in outputs[0][0]


def test_a_changed_source_rebuilds(tmp_path):
    catalog.load(str(tmp_path))
    path = catalog.path_in(str(tmp_path))
    document = json.load(open(path))
    source = next(iter(document["sources"]))
    document["sources"][source] = "0" * 64
    document["catalog"]["methods"][0]["summary"] = "stale"
    json.dump(document, open(path, "w"))
    fresh = catalog.load(str(tmp_path))
    assert fresh.methods[0].summary != "stale"
    assert json.load(open(path))["sources"][source] != "0" * 64


def test_a_malformed_catalog_is_rebuilt(tmp_path):
    catalog.load(str(tmp_path))
    path = catalog.path_in(str(tmp_path))
    document = json.load(open(path))
    document["catalog"]["methods"][0]["hyperparameters"] = [{"name": 3}]
    json.dump(document, open(path, "w"))
    assert asdict(catalog.load(str(tmp_path))) == asdict(catalog.build())
    assert json.load(open(path))["catalog"] == asdict(catalog.build())


def test_a_file_that_is_not_a_catalog_is_left_alone(tmp_path, capsys):
    path = catalog.path_in(str(tmp_path))
    for text in ('{"mine": true}', "not json"):
        open(path, "w").write(text)
        assert asdict(catalog.load(str(tmp_path))) == asdict(catalog.build())
        assert open(path).read() == text
        assert "is not a catalog this harness wrote" in capsys.readouterr().err


def test_installing_a_plugin_rebuilds(tmp_path, monkeypatch):
    catalog.load(str(tmp_path))
    built = []
    real_build = catalog.build
    monkeypatch.setattr(catalog, "build", lambda: built.append(1) or real_build())
    catalog.load(str(tmp_path))
    assert built == []                                       # unchanged: read from the cache
    monkeypatch.setattr(catalog, "_plugins", lambda: [["merge_harness.methods", "x", "p:X",
                                                       "p", "0.1"]])
    catalog.load(str(tmp_path))
    assert built == [1]                                      # a new entry point: rebuilt

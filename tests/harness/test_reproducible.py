"""Reproducible builds: the pinned environment, pinned cache entries, and the runner building
suites pinned before it uses them. (A whole pinned rebuild of tiny, compared with the
checked-in records, runs in CI: scripts/reproduce_records.py.)"""

import subprocess
import sys

import pytest
import torch

import harness.bench.runner as runner
from harness.core.reproducible import (MARKER, PINNED_ENV, is_pinned, machine_details,
                                       pin_torch, pinned_command)
from harness.tasks.cache import CheckpointCache


def test_the_pinned_environment_is_set_before_torch_loads():
    argv, env = pinned_command("harness.bench.build", "--suite", "tiny")
    assert argv[1:] == ["-m", "harness.bench.build", "--suite", "tiny"]
    assert env["ATEN_CPU_CAPABILITY"] == "default" and env["MKL_CBWR"] == "COMPATIBLE"
    assert env["OMP_NUM_THREADS"] == "1" and env[MARKER] == "1"
    assert not is_pinned()
    with pytest.raises(RuntimeError, match="pinned environment"):
        pin_torch()
    code = ("from harness.core.reproducible import pin_torch, machine_details; pin_torch(); "
            "d = machine_details(); print(d['pinned'], d['threads'], d['aten_capability'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["True", "1", "DEFAULT"]


def test_cache_entries_record_their_build_and_pinned_caches_rebuild_unpinned_ones(tmp_path):
    cache = CheckpointCache(str(tmp_path), {"r": 1})
    cache.put("a", {"w": torch.ones(2)})
    build = cache.info("a")["build"]
    assert build["pinned"] is False and build["torch"] == torch.__version__
    assert not cache.pinned(cache.path("a"))
    assert CheckpointCache(str(tmp_path), {"r": 1}, pinned_only=False).has("a")
    assert not CheckpointCache(str(tmp_path), {"r": 1}, pinned_only=True).has("a")


class _Suite:
    name, builds, cache_dir = "tiny", True, "/nowhere"

    def __init__(self, built):
        self._built = built

    def built(self):
        return self._built


def test_the_runner_builds_unbuilt_suites_pinned_first(monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "build_pinned", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(runner, "get_suite", lambda *a, **k: "reopened")
    config = runner.RunConfig(method="ties", suite="tiny", quiet=True)
    monkeypatch.delenv(runner.UNPINNED_BUILDS, raising=False)
    assert runner.ensure_built(_Suite(built=True), config).built()
    assert runner.ensure_built(_Suite(built=False), config) == "reopened"
    assert calls == [("tiny", "/nowhere", None)]
    monkeypatch.setenv(runner.UNPINNED_BUILDS, "1")
    suite = _Suite(built=False)
    assert runner.ensure_built(suite, config) is suite and len(calls) == 1


def test_machine_details_name_what_can_change_results():
    details = machine_details()
    assert {"cpu", "cpu_flags", "aten_capability", "threads", "torch", "pinned"} <= set(details)
    assert set(PINNED_ENV) >= {"ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS"}

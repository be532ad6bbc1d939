"""The package's shape: one import namespace, the public API, layers that import downward only,
and modules of a readable size."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_public_api_imports_from_harness():
    from harness import LazyStateDict, MergeResult, get_method, list_methods

    assert "dts-d" in list_methods() and get_method("ties").name == "ties"
    assert LazyStateDict.__module__ == "harness.io.lazy"
    assert MergeResult.__module__ == "harness.engine.result"


def test_methods_and_suites_live_under_harness_only(tmp_path):
    """Only ``harness`` is installed: a project with its own ``tasks/`` or ``methods/`` folder
    neither shadows nor is shadowed by ours."""
    import harness.methods.ties
    import harness.tasks.tiny

    assert harness.methods.ties.Ties.name == "ties" and harness.tasks.tiny.TinySuite.name
    code = ("import importlib.util as u; print(u.find_spec('tasks'), u.find_spec('methods'), "
            "u.find_spec('harness.tasks') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.split() == ["None", "None", "True"]


def test_importing_harness_loads_no_torch():
    code = "import sys, harness; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_layers_import_downward_only_and_without_cycles():
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    out = subprocess.run(["lint-imports", "--config", os.path.join(ROOT, "pyproject.toml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "2 kept, 0 broken" in out.stdout


def test_no_module_is_over_600_lines():
    long = []
    for folder in ("harness", "methods", "tasks"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            if os.path.islink(base):
                continue
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(base, name)
                    with open(path, encoding="utf-8") as f:
                        lines = sum(1 for _ in f)
                    if lines > 600:
                        long.append((os.path.relpath(path, ROOT), lines))
    assert not long

"""Every method's outputs on fixed inputs, pinned by sha256 (``scripts/method_hashes.py``): a
change that moves a bit of any output, stored payload or served weight fails here, naming the
cases and keys that moved. Regenerate the file only when a change is meant to alter outputs."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPECTED = os.path.join(ROOT, "tests", "data", "method_hashes.json")


def _script():
    spec = importlib.util.spec_from_file_location(
        "method_hashes", os.path.join(ROOT, "scripts", "method_hashes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_output_keeps_its_bits():
    script = _script()
    with open(EXPECTED, encoding="utf-8") as f:
        expected = json.load(f)
    actual = script.compute_pinned()
    assert set(actual) == {name for name, *_ in script.CASES}
    assert script.differences(expected, actual) == []


def test_the_check_names_what_moved():
    script = _script()
    expected = {"ties-sum": {"base/a": "0" * 64, "base/b": "1" * 64}, "gone": {}}
    actual = {"ties-sum": {"base/a": "0" * 64, "base/b": "2" * 64}, "new": {}}
    assert script.differences(expected, actual) == [
        "gone: case missing", "new: new case", "ties-sum: 1 hash(es) differ: base/b"]

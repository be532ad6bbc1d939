import os
import subprocess
import sys
import textwrap

import pytest

from harness import HyperparameterError, UnknownNameError, get_method, list_methods, method_class
from harness.core.registry import Registry
from tests.conftest import install_plugin

EXPECTED = ["bitdelta", "dare", "dare-ties", "della", "dts-d", "dts-d-star", "dts-t", "dts-t-star", "emr", "iso-c",
            "iso-cts", "model-stock", "svd", "t-switch", "tall-mask", "task-arithmetic", "ties",
            "tsv-m", "weight-averaging"]


def test_every_method_is_registered():
    assert set(EXPECTED) <= set(list_methods())


def test_star_aliases():
    assert method_class("dts-t*") is method_class("dts-t-star")
    assert method_class("dts-d*").name == "dts-d-star"


def test_unknown_method_suggests_near_matches():
    with pytest.raises(UnknownNameError, match="unknown method 'dts_d'.*'dts-d'"):
        get_method("dts_d")
    with pytest.raises(UnknownNameError, match="'ties'"):
        get_method("tie")


def test_targets_load_lazily():
    registry = Registry("thing", "merge_harness.none", {"x": "no_such_module:Thing"})
    assert registry.names() == ["x"]          # listing imports nothing
    with pytest.raises(ImportError, match="thing 'x' could not be loaded"):
        registry.get("x")


def test_hyperparameters_are_typed_and_named():
    assert get_method("dts-d", density="0.25").density == 0.25
    assert get_method("ties", merge_function="mean").merge_function == "mean"
    assert get_method("tall-mask", lam='{"a": 0.2}').lam == {"a": 0.2}
    assert get_method("svd", density="none").density is None
    with pytest.raises(HyperparameterError, match="no hyperparameter 'densty'.*'density'"):
        get_method("dts-d", densty=0.3)
    with pytest.raises(HyperparameterError, match="'density' must be float"):
        get_method("dts-t", density="high")
    with pytest.raises(HyperparameterError, match="'merge_function' must be"):
        get_method("ties", merge_function="max")
    with pytest.raises(HyperparameterError, match="'p' must be in"):
        get_method("dare", p=1.0)


def test_hyperparameter_listing_has_defaults_and_help():
    hps = {h.name: h for h in method_class("dts-d").hyperparameters()}
    assert hps["density"].default == 0.3 and hps["density"].type == "float"
    assert hps["svd_signs"].default == "canonical" and hps["svd_signs"].help


def test_every_method_documents_itself():
    for name in EXPECTED:
        cls = method_class(name)
        assert cls.__doc__ and cls.name == name


PLUGIN = '''
from dataclasses import dataclass

from harness.engine.method import hp
from harness.methods.task_arithmetic import TaskArithmetic


@dataclass(frozen=True)
class HalfArithmetic(TaskArithmetic):
    """Task Arithmetic at lam = 0.5: a plugin for the tests."""

    name = "half-arithmetic"
    lam: float = hp(0.5, "scaling coefficient")
'''


def test_plugin_method_through_entry_point(tmp_path):
    site = install_plugin(tmp_path, "mh_demo_plugin", PLUGIN, {
        "merge_harness.methods": {"half-arithmetic": "mh_demo_plugin:HalfArithmetic"}})
    code = textwrap.dedent('''
        import torch
        from harness import get_method, list_methods
        assert "half-arithmetic" in list_methods()
        m = get_method("half-arithmetic")
        pre = {"w": torch.zeros(2)}
        ft = {"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(2)}}
        print(m.merge(pre, ft).base["w"].tolist())
    ''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.getcwd()]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1.0, 1.0]"


def test_dts_d_takes_the_suites_ties_setting_once():
    """A suite states TIES's merge function once; DTS-D and DTS-D*, which compose a TIES
    configuration under the prefix ``ties_``, build their base with it, and their own setting
    or the user's wins."""
    from harness.bench.runner import build_method
    from harness.tasks.offline_text import OfflineTextSuite

    suite = OfflineTextSuite.__new__(OfflineTextSuite)        # its defaults only, no cache
    for name in ("dts-d", "dts-d-star"):
        assert build_method(suite, name, {}).ties_merge_function == "mean"
        assert build_method(suite, name, {"ties_merge_function": "sum"}).ties_merge_function \
            == "sum"
    assert build_method(suite, "ties", {}).merge_function == "mean"
    assert method_class("dts-d").defaults_from(lambda name: {"ties": {"k": 5.0, "lam": 1.0},
                                                             "dts-d": {"ties_k": 9.0}}
                                               .get(name, {})) == {"ties_k": 9.0, "ties_lam": 1.0}

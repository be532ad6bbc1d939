"""The plugin package in ``examples/`` installs and runs as a user's would: pip builds it, the
entry point registers its method, and the method computes mergekit's Model Breadcrumbs."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "examples", "merge-harness-breadcrumbs")

CHECK = r"""
import torch
from harness import get_method, list_methods
from tests.conftest import make_models
from merge_harness_breadcrumbs import breadcrumbs_mask

assert "breadcrumbs" in list_methods()
pre, ft = make_models(n_tasks=3)
g = torch.Generator().manual_seed(1)
pre["big.weight"] = torch.randn(40, 30, generator=g)
for model in ft.values():
    model["big.weight"] = pre["big.weight"] + 0.1 * torch.randn(40, 30, generator=g)
method = get_method("breadcrumbs", density=0.5, gamma=0.05)
merged = method.merge(pre, ft).base

# mergekit's magnitude_outliers (sparsify.py), transcribed; its n_top = 0 slice is avoided here
def magnitude_outliers(tensor, density, gamma):
    num_elems = tensor.numel()
    target_n = int(density * num_elems)
    n_top = int(gamma * num_elems)
    n_bot = num_elems - target_n - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    w = tensor.abs().view(-1).float()
    indices = torch.sort(w, descending=False).indices
    mask = torch.zeros_like(tensor)
    mask.view(-1)[indices[n_bot:-n_top]] = 1
    return tensor * mask

taus = [m["big.weight"] - pre["big.weight"] for m in ft.values()]
expected = pre["big.weight"] + 0.3 * torch.stack(
    [magnitude_outliers(t, 0.5, 0.05) for t in taus]).sum(dim=0)
assert torch.equal(merged["big.weight"], expected)
kept = breadcrumbs_mask(taus[0], 0.5, 0.05)
assert int(kept.sum()) == 600 and float(taus[0].abs()[kept.bool()].max()) < float(
    taus[0].abs().max())
assert int(breadcrumbs_mask(torch.randn(10), 0.5, 0.01).sum()) == 5   # no top cut: 0 outliers
try:
    get_method("breadcrumbs", gamma=1.5)
except Exception as error:
    assert "gamma" in str(error)
else:
    raise AssertionError("gamma=1.5 accepted")
print("plugin ok")
"""


def test_the_example_plugin_installs_registers_and_merges(tmp_path):
    import shutil

    source, site = tmp_path / "source", tmp_path / "site"
    shutil.copytree(PLUGIN, source)          # pip builds in place: never inside the checkout
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT])}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plugin ok" in out.stdout
    assert not (tmp_path / "site" / "harness").exists()         # the plugin alone was installed


def test_the_example_plugin_is_not_built_in():
    from harness import list_methods

    if "breadcrumbs" in list_methods():
        pytest.skip("the example plugin is installed in this environment")
    assert not os.path.exists(os.path.join(ROOT, "methods", "breadcrumbs.py"))

"""Fixtures: small random models built in code (never downloaded)."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)     # one thread per xdist worker: no oversubscribed cores

# No test may reach the network: the hubs and pip (in subprocesses too) are told to stay
# offline, and any name lookup or connection this process makes beyond the loopback fails,
# naming the address.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "PIP_NO_INDEX"):
    os.environ[_name] = "1"

# Suites built in-process by the fixtures (faster, two threads) are accepted as they are; the
# pinned, reproducible builds have tests and a CI step of their own.
os.environ["MERGE_HARNESS_UNPINNED_BUILDS"] = "1"

# Nothing a test runs writes into the user's own cache or results (``harness ls`` caches its
# listing in the cache folder): both default to folders of this test session.
_session_home = tempfile.mkdtemp(prefix="merge-harness-tests-")
os.environ["MERGE_HARNESS_CACHE"] = os.path.join(_session_home, "cache")
os.environ["MERGE_HARNESS_RESULTS"] = os.path.join(_session_home, "results")


class NetworkUsedError(RuntimeError):
    """A test tried to reach the network."""


def _local(address) -> bool:
    if not isinstance(address, tuple):          # a Unix socket path
        return True
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:                          # a host name: would need a DNS lookup
        return address[0] in ("localhost", "")


def _guarded(connect):
    def guarded_connect(sock, address):
        if not _local(address):
            raise NetworkUsedError(f"a test tried to connect to {address!r}; tests run offline")
        return connect(sock, address)
    return guarded_connect


def _guarded_lookup(lookup):
    def guarded_getaddrinfo(host, port, *args, **kwargs):
        if host is not None and not _local((host if isinstance(host, str) else host.decode(),)):
            raise NetworkUsedError(f"a test tried to look up {host!r}; tests run offline")
        return lookup(host, port, *args, **kwargs)
    return guarded_getaddrinfo


socket.socket.connect = _guarded(socket.socket.connect)
socket.socket.connect_ex = _guarded(socket.socket.connect_ex)
socket.getaddrinfo = _guarded_lookup(socket.getaddrinfo)


def make_models(n_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                scale: float = 0.1) -> tuple[dict, dict]:
    """A pretrained state dict with every tensor kind, and ``n_tasks`` perturbed copies."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g)

    pretrained = {
        "embed.weight": rnd(20, 8),
        "layer.weight": rnd(8, 8),
        "layer.bias": rnd(8),
        "conv.weight": rnd(4, 2, 3, 3),
        "logit_scale": torch.tensor(2.5),
        "frozen.weight": rnd(8, 4),          # never changed by any task
        "position_ids": torch.arange(10),    # an integer buffer
    }
    finetuned = {}
    for t in range(n_tasks):
        model = {}
        for key, value in pretrained.items():
            if not value.is_floating_point() or key == "frozen.weight":
                model[key] = value.clone()
            else:
                model[key] = value + scale * rnd(*value.shape)
        finetuned[f"task{t}"] = model
    if dtype != torch.float32:
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pretrained.items()}
        finetuned = {t: {k: v.to(dtype) if v.is_floating_point() else v for k, v in m.items()}
                     for t, m in finetuned.items()}
        pretrained = cast
    return pretrained, finetuned


def load_script(name: str):
    """A module of ``scripts/`` (not a package), imported from its file."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# stand-in modules for merges that see data, the ones the method hashes use: LinearsOf(state)
# calls an nn.Linear per 2-D float .weight key on a batch's first columns; ToyTaskModel(state)
# holds every float tensor under backbone.<key> and gives one logit per such matrix
LinearsOf, ToyTaskModel = load_script("method_hashes").stand_in_modules()


def task_inputs(finetuned, examples: int = 12, batch_size: int = 5, width: int = 48, seed: int = 7):
    """:class:`harness.core.data.TaskInputs` for ``finetuned``'s tasks over ``LinearsOf`` and
    ``ToyTaskModel``: random batches, different per task."""
    from harness.core.data import TaskInputs

    g = torch.Generator().manual_seed(seed)
    batches = {task: list(torch.randn(examples, width, generator=g).split(batch_size))
               for task in finetuned}
    return TaskInputs("validation", batches, LinearsOf, lambda task, state: ToyTaskModel(state))


def merge_kwargs(method, finetuned) -> dict:
    """What ``method.merge`` needs beyond the models: ``data=`` for a merge that sees data."""
    return {"data": task_inputs(finetuned)} if method.needs_data else {}


@pytest.fixture
def models():
    return make_models()


def install_plugin(tmp_path, module: str, source: str, entry_points: dict[str, dict[str, str]]):
    """Build and install a one-module plugin package into ``tmp_path/site``; return the folder
    to put on PYTHONPATH."""
    import subprocess
    import sys
    import textwrap

    pkg = tmp_path / "plugin"
    (pkg / module).mkdir(parents=True)
    (pkg / module / "__init__.py").write_text(textwrap.dedent(source))
    groups = "".join(
        f'[project.entry-points."{group}"]\n' + "".join(f'"{k}" = "{v}"\n' for k, v in eps.items())
        for group, eps in entry_points.items())
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{module.replace("_", "-")}"\nversion = "0.1"\n{groups}'
        f'[tool.setuptools]\npackages = ["{module}"]\n')
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(pkg)],
                   check=True, capture_output=True)
    return site


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache folder holding the built ``tiny`` suite (built once per test session)."""
    from harness.tasks.tiny import TinySuite

    folder = tmp_path_factory.mktemp("cache")
    TinySuite(str(folder)).prepare(progress=False)
    return str(folder)

"""merge-harness: a benchmark harness for model merging.

The Python API::

    from harness import get_method, list_methods, LazyStateDict, MergeResult
    method = get_method("dts-d", density=0.3)
    result = method.merge(pretrained, finetuned)   # -> MergeResult
    with merge_device("cuda"):                      # compute on a GPU, key by key
        result = method.merge(pretrained, finetuned)

The package is layered (each layer imports only those below it): ``harness.core`` (algebra,
validation, errors, registry) <- ``harness.io`` (files, lazy reading, pages, shards) <-
``harness.engine`` (the merge protocol, results) <- ``harness.methods`` and ``harness.tasks``
(methods and suites, each independent of the other) <- ``harness.bench`` (runner, records,
leaderboard, CLI). The names below are imported on first use, so ``import harness`` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "HyperparameterError": "harness.core.errors",
    "MergeInputError": "harness.core.errors",
    "MethodNotApplicable": "harness.core.errors",
    "NonFiniteOutputError": "harness.core.errors",
    "UnknownNameError": "harness.core.registry",
    "METHODS": "harness.core.registry",
    "SUITES": "harness.core.registry",
    "merge_device": "harness.core.tensors",
    "LazyStateDict": "harness.io.lazy",
    "MergeMethod": "harness.engine.method",
    "hp": "harness.engine.method",
    "require": "harness.engine.method",
    "MergeResult": "harness.engine.result",
    "TaskPayload": "harness.engine.codecs",
    "Codec": "harness.engine.codecs",
    "ResultFormatError": "harness.engine.storage",
    "stream_outputs": "harness.engine.outputs",
}

__all__ = sorted([*_EXPORTS, "get_method", "list_methods", "list_suites", "method_class"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def method_class(name: str):
    """The class registered under ``name`` (aliases such as ``dts-d*`` accepted)."""
    from harness.core.registry import METHODS

    return METHODS.get(name)


def get_method(name: str, **hyperparameters):
    """A method instance; unknown names and bad hyperparameters raise naming the problem."""
    return method_class(name).create(**hyperparameters)


def list_methods() -> list[str]:
    """Every registered method name, plugins included."""
    from harness.core.registry import METHODS

    return METHODS.names()


def list_suites() -> list[str]:
    """Every registered suite name, plugins included."""
    from harness.core.registry import SUITES

    return SUITES.names()

"""merge-harness: a benchmark harness for model merging.

The Python API::

    from harness import get_method, list_methods
    method = get_method("dts-d", density=0.3)
    result = method.merge(pretrained, finetuned)   # -> MergeResult
    with merge_device("cuda"):                      # compute on a GPU, key by key
        result = method.merge(pretrained, finetuned)
"""

from __future__ import annotations

from harness.method import HyperparameterError, MergeMethod, MethodNotApplicable
from harness.registry import METHODS, SUITES, UnknownNameError
from harness.result import MergeResult, ResultFormatError
from harness.sharded import stream_outputs
from harness.state_dict import LazyStateDict, MergeInputError, merge_device

__all__ = [
    "HyperparameterError", "LazyStateDict", "MergeInputError", "MergeMethod", "MergeResult",
    "MethodNotApplicable",
    "ResultFormatError", "UnknownNameError", "get_method", "list_methods", "list_suites",
    "merge_device", "method_class", "stream_outputs",
]


def method_class(name: str) -> type[MergeMethod]:
    """The class registered under ``name`` (aliases such as ``dts-d*`` accepted)."""
    return METHODS.get(name)


def get_method(name: str, **hyperparameters) -> MergeMethod:
    """A method instance; unknown names and bad hyperparameters raise naming the problem."""
    return method_class(name).create(**hyperparameters)


def list_methods() -> list[str]:
    """Every registered method name, plugins included."""
    return METHODS.names()


def list_suites() -> list[str]:
    """Every registered suite name, plugins included."""
    return SUITES.names()

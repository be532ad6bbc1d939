"""The method contract: a frozen dataclass of typed hyperparameters, one ``merge`` call, and
the hooks a method declares instead of being special-cased by the runner or the leaderboard.

Subclasses declare their hyperparameters as dataclass fields with the spec's defaults and check
their ranges in ``check()``; every float hyperparameter must be finite. :meth:`MergeMethod.create`
builds one from keyword values, accepting strings (as the command line gives them) and naming
any unknown or invalid hyperparameter. Most methods take one of the shapes in
:mod:`harness.engine.templates` or :mod:`harness.engine.masked` and only write their rule.

Declared facts and hooks (class attributes):

- ``kind``: ``"shared"`` (one merged model) or ``"personalized"`` (a payload per task);
- ``family`` and ``year``: where the method sits among others (leaderboards order their rows by
  kind, family, year, then name);
- ``display_name``: the name as the literature writes it (``DTS-D*``, ``Ties-Merging``);
- ``tuned_per_task``: a hyperparameter the runner chooses per task on validation data, with its
  grid (TALL-Mask's ``lam``), when the user gives no value and the suite has a validation split;
- ``composes``: hyperparameter prefixes that configure another registered method inside this
  one (DTS-D's ``ties_`` options are TIES's), so a suite states that method's setting once;
- ``needs_data``: what a merge that sees data needs, in words (None for data-free merges). Such
  a method's ``merge`` takes ``data=`` (:class:`harness.core.data.TaskInputs`, from a suite
  that provides inputs) and its ``data_request()`` says how many examples, in what batches.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from harness.core.errors import HyperparameterError, MethodNotApplicable
from harness.core.tensors import StateDict
from harness.engine.result import MergeResult

__all__ = ["Hyperparameter", "HyperparameterError", "MergeMethod", "MethodNotApplicable",
           "TunedPerTask", "hp", "require"]


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    name: str
    type: str
    default: Any
    help: str


@dataclasses.dataclass(frozen=True)
class TunedPerTask:
    """A hyperparameter the runner chooses per task by validation metric, from ``grid``."""

    name: str
    grid: tuple


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """Base class of every merge method; see the module docstring."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "shared"   # "shared" or "personalized"
    family: ClassVar[str] = ""
    year: ClassVar[int] = 0
    display_name: ClassVar[str] = ""
    tuned_per_task: ClassVar[TunedPerTask | None] = None
    composes: ClassVar[dict[str, str]] = {}   # hyperparameter prefix -> registered method name
    needs_data: ClassVar[str | None] = None   # what a merge that sees data needs, in words

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value.values() if isinstance(value, Mapping) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise HyperparameterError(
                        f"{self.name}: hyperparameter {f.name!r} must be finite, got {v}")
        self.check()

    def check(self) -> None:
        """Raise :class:`HyperparameterError` for out-of-range hyperparameters."""

    def merge(self, pretrained: StateDict, finetuned: Mapping[str, StateDict], *,
              progress: bool = False) -> MergeResult:
        raise NotImplementedError

    def data_request(self) -> dict:
        """For a method with ``needs_data``: ``{"examples": per task, "batch_size": ...}``."""
        return {}

    # ---- hyperparameters -----------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> list[Hyperparameter]:
        hints = typing.get_type_hints(cls)
        return [Hyperparameter(f.name, _type_name(hints[f.name]), f.default,
                               f.metadata.get("help", ""))
                for f in dataclasses.fields(cls)]

    @classmethod
    def create(cls, **values: Any) -> MergeMethod:
        """Build the method from keyword hyperparameters (strings are parsed to their type)."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for raw_name, value in values.items():
            name = raw_name.replace("-", "_")
            if name not in names:
                close = difflib.get_close_matches(name, names, n=2, cutoff=0.5)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                known = ", ".join(names) or "none"
                raise HyperparameterError(
                    f"{cls.name} has no hyperparameter {raw_name!r}.{hint} Its hyperparameters: "
                    f"{known}.")
            kwargs[name] = _coerce(cls.name, name, value, hints[name])
        return cls(**kwargs)

    def params(self) -> dict[str, Any]:
        """The hyperparameters as plain JSON-able values (those declared with
        ``silent_default`` only when set to another value than their default)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.metadata.get("silent_default") and getattr(self, f.name) == f.default)}

    @classmethod
    def label(cls) -> str:
        """The name to show a reader: ``display_name``, else the registry name."""
        return cls.display_name or cls.name

    @classmethod
    def defaults_from(cls, defaults_for) -> dict[str, Any]:
        """The hyperparameter values a suite sets for this method: ``defaults_for(name)`` gives
        a suite's settings of a registered method; those of each composed method are applied
        under their prefix (a suite's TIES ``merge_function`` becomes DTS-D's
        ``ties_merge_function``), then this method's own, which win."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for prefix, component in cls.composes.items():
            for name, value in defaults_for(component).items():
                if prefix + name in names:
                    values[prefix + name] = value
        return {**values, **defaults_for(cls.name)}


def hp(default: Any, help: str, *, silent_default: bool = False) -> Any:
    """A dataclass field with a default and a one-line help text.

    ``silent_default``: for a hyperparameter added after results were recorded whose default
    reproduces those results bit for bit; at its default it is left out of
    :meth:`MergeMethod.params`, so the names and contents of records made before it existed
    still match the runs that would make them now."""
    return dataclasses.field(default=default, metadata={"help": help,
                                                        "silent_default": silent_default})


def require(condition: bool, method: str, name: str, message: str) -> None:
    if not condition:
        raise HyperparameterError(f"{method}: hyperparameter {name!r} {message}")


def _type_name(tp: Any) -> str:
    """A hyperparameter's type as a user reads it: ``float | dict[str, float]``,
    ``'sum' | 'mean'``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if origin in (typing.Union, _UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(_type_name, args))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(method: str, name: str, value: Any, tp: Any) -> Any:
    """Parse ``value`` to the annotated type ``tp``, or raise naming the hyperparameter."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, _UnionType) else (tp,)
    for option in options:
        try:
            return _coerce_one(value, option)
        except (TypeError, ValueError):
            continue
    raise HyperparameterError(
        f"{method}: hyperparameter {name!r} must be {_type_name(tp)}, got {value!r}")


_UnionType = type(int | str)


def _coerce_one(value: Any, tp: Any) -> Any:
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        raise ValueError("not None")
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError("not a choice")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError("not a bool")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("bool is not int")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value)
        raise TypeError("not an int")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("bool is not float")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise TypeError("not a float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError("not a str")
    if typing.get_origin(tp) is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, Mapping):
            _, vt = typing.get_args(tp)
            return {str(k): _coerce_one(v, vt) for k, v in value.items()}
        raise TypeError("not a mapping")
    raise TypeError(f"unsupported hyperparameter type {tp}")

"""A small registry of named, lazily imported targets (methods, suites).

Targets are ``"package.module:Attribute"`` strings, imported on first use, so listing names costs
nothing. Third-party packages add entries through a packaging entry-point group; an unknown name
raises an error that suggests the nearest registered names.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Any


class UnknownNameError(KeyError):
    """A name that is not registered; the message names the nearest matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def load_target(target: str) -> Any:
    """Import ``"module:attr"`` (attr may be dotted) and return the attribute."""
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"registry target {target!r} is not of the form 'module:attribute'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry:
    """Names to lazily loaded objects, with aliases and an entry-point group for plugins."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str],
                 aliases: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._targets: dict[str, Any] = dict(builtins)
        self._aliases = dict(aliases or {})
        self._plugins_loaded = False

    def register(self, name: str, target: Any) -> None:
        """Add a target (an object, or a ``"module:attr"`` string) under ``name``."""
        self._targets[name] = target

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            self._targets.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        """Every registered name (built-ins and plugins), sorted."""
        self._load_plugins()
        return sorted(self._targets)

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (resolving aliases); raises with suggestions."""
        self._load_plugins()
        key = self._aliases.get(name, name)
        if key in self._targets:
            return key
        choices = list(self._targets) + list(self._aliases)
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(self.names())}.")

    def get(self, name: str) -> Any:
        """The object registered under ``name``, importing it on first use."""
        key = self.canonical(name)
        target = self._targets[key]
        if isinstance(target, str):
            try:
                target = load_target(target)
            except (ImportError, AttributeError) as exc:
                raise ImportError(
                    f"{self.kind} {key!r} could not be loaded from {self._targets[key]!r}: {exc}"
                ) from exc
            self._targets[key] = target
        return target


METHODS = Registry(
    "method", "merge_harness.methods",
    {
        "weight-averaging": "harness.methods.weight_averaging:WeightAveraging",
        "task-arithmetic": "harness.methods.task_arithmetic:TaskArithmetic",
        "ties": "harness.methods.ties:Ties",
        "dare": "harness.methods.dare:Dare",
        "emr": "harness.methods.emr:Emr",
        "tall-mask": "harness.methods.tall_mask:TallMask",
        "t-switch": "harness.methods.t_switch:TSwitch",
        "svd": "harness.methods.svd:SvdBaseline",
        "dts-t": "harness.methods.dts:DtsT",
        "dts-d": "harness.methods.dts:DtsD",
        "dts-t-star": "harness.methods.dts_star:DtsTStar",
        "dts-d-star": "harness.methods.dts_star:DtsDStar",
        "iso-c": "harness.methods.isotropic:IsoC",
        "iso-cts": "harness.methods.isotropic:IsoCts",
        "tsv-m": "harness.methods.tsv:TsvM",
        "model-stock": "harness.methods.model_stock:ModelStock",
        "regmean": "harness.methods.regmean:RegMean",
        "fisher": "harness.methods.fisher:Fisher",
        "adamerging": "harness.methods.adamerging:AdaMerging",
        "adamerging-layer": "harness.methods.adamerging:AdaMergingLayer",
        "bitdelta": "harness.methods.bitdelta:BitDelta",
        "dare-ties": "harness.methods.dare_ties:DareTies",
        "della": "harness.methods.della:Della",
    },
    aliases={"dts-t*": "dts-t-star", "dts-d*": "dts-d-star"},
)

SUITES = Registry(
    "suite", "merge_harness.suites",
    {
        "tiny": "harness.tasks.tiny:TinySuite",
        "offline-text": "harness.tasks.offline_text:OfflineTextSuite",
        "offline-vision": "harness.tasks.offline_vision:OfflineVisionSuite",
        "offline-llm": "harness.tasks.offline_llm:OfflineLLMSuite",
        "offline-llm-cls": "harness.tasks.offline_llm_cls:OfflineLLMClassifierSuite",
        "vit-b32": "harness.tasks.clip:VitB32Suite",
        "vit-l14": "harness.tasks.clip:VitL14Suite",
        "roberta-glue": "harness.tasks.glue:RobertaGlueSuite",
        "gpt2-glue": "harness.tasks.glue:Gpt2GlueSuite",
        "qwen": "harness.tasks.qwen:QwenSuite",
    },
)

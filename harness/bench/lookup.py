"""Suites and methods by name, through the registries: the only way the bench layer reaches a
concrete suite or method."""

from __future__ import annotations

import inspect

from harness.core.registry import METHODS, SUITES
from harness.engine.method import MergeMethod
from harness.tasks.base import Suite


FLAGS = {"config": "--suite-config", "encoder": "--encoder", "finetune_seed": "--finetune-seed"}


def get_suite(name: str, cache_dir: str | None = None, *, config: str | None = None,
              encoder: str | None = None, finetune_seed: int | None = None) -> Suite:
    """The suite ``name``; ``config``, ``encoder`` and a fine-tuning seed other than 0 go to
    suites that take them (a suite that does not refuses them, naming the flag)."""
    cls = SUITES.get(name)
    options = {k: v for k, v in (("config", config), ("encoder", encoder),
                                 ("finetune_seed", finetune_seed or None)) if v is not None}
    params = inspect.signature(cls).parameters
    refused = [k for k in options if k not in params]
    if refused:
        hint = (": it fine-tunes no task models itself" if refused[0] == "finetune_seed"
                else "")
        raise ValueError(f"suite {name!r} takes no {FLAGS[refused[0]]}{hint}")
    return cls(cache_dir, **options)


def build_method(suite: Suite, name: str, overrides: dict) -> MergeMethod:
    """The method with the suite's defaults (those of the methods it composes included), then
    the user's overrides (validated)."""
    cls = METHODS.get(name)
    return cls.create(**{**cls.defaults_from(suite.defaults_for), **overrides})

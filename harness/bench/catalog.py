"""What ``harness ls`` prints, without importing torch on every call.

Listing methods and suites needs their classes (docstrings, typed hyperparameters, the defaults
each suite applies), and importing them imports torch, which alone takes about a second. So the
listing is built once by importing everything, and kept as a JSON *catalog* in the user's cache
(``<cache>/catalog.json``) together with what it was built from: the SHA-256 of every source
file of the harness and of its plugins that the build imported, the plugins' entry points and
distributions, and the Python version. A later ``ls`` reads the catalog, re-hashes those files
(milliseconds) and uses it only if all of them match; otherwise it imports and rebuilds. The
result is the same either way (a test checks that), only the time differs.

The catalog is an untrusted file like any other in the cache: it is parsed as JSON and checked
field by field, never executed; a stale or malformed catalog is rebuilt, and a file at that path
that is not a catalog this harness wrote is left alone (the listing is then just not cached).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points

from harness.core.registry import METHODS, SUITES

FORMAT = "merge-harness-catalog/1"
FILE_NAME = "catalog.json"
GROUPS = (METHODS.group, SUITES.group)


@dataclass(frozen=True)
class HyperparameterLine:
    name: str
    type: str
    default: str          # repr() of the value
    help: str


@dataclass(frozen=True)
class MethodEntry:
    name: str
    kind: str
    title: str
    summary: str
    hyperparameters: list[HyperparameterLine]
    applied: dict[str, dict[str, str]] = field(default_factory=dict)  # suite -> hp -> repr


@dataclass(frozen=True)
class SuiteEntry:
    name: str
    family: str
    seen: list[str]
    unseen: list[str]


@dataclass(frozen=True)
class Catalog:
    methods: list[MethodEntry]
    suites: list[SuiteEntry]


def summary(docstring: str | None) -> str:
    """The first paragraph of a docstring as one line of plain text (reST ``literals`` and
    :role:`targets` unwrapped)."""
    import re

    paragraph = re.split(r"\n\s*\n", (docstring or "").strip())[0]
    text = " ".join(line.strip() for line in paragraph.splitlines())
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def build() -> Catalog:
    """The catalog from the registered classes themselves (imports every method and suite)."""
    from harness.bench.lookup import get_suite

    suites = [get_suite(name) for name in SUITES.names()]
    methods = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        title, text = cls.display_name or name, summary(cls.__doc__)
        text = text[len(title) + 1:].lstrip() if text.startswith(title + ":") else text
        applied = {suite.name: {k: repr(v) for k, v in cls.defaults_from(suite.defaults_for)
                                .items()} for suite in suites}
        methods.append(MethodEntry(
            name, cls.kind, title, text,
            [HyperparameterLine(hp.name, hp.type, repr(hp.default), hp.help)
             for hp in cls.hyperparameters()],
            {k: v for k, v in applied.items() if v}))
    return Catalog(methods, [SuiteEntry(s.name, s.family, s.split_tasks("seen"),
                                        list(s.unseen)) for s in suites])


def _plugins() -> list[list[str]]:
    """Every plugin entry point of both registries, with its distribution and version."""
    rows = []
    for group in GROUPS:
        for ep in entry_points(group=group):
            dist = getattr(ep, "dist", None)
            rows.append([group, ep.name, ep.value, getattr(dist, "name", "") or "",
                         getattr(dist, "version", "") or ""])
    return sorted(rows)


def _source_roots() -> tuple[str, ...]:
    """Top-level module names whose files the catalog depends on: the harness and plugins."""
    roots = {"harness", "methods", "tasks"}
    for _, _, value, _, _ in _plugins():
        roots.add(value.partition(":")[0].split(".")[0])
    return tuple(sorted(roots))


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def _sources() -> dict[str, str]:
    """SHA-256 of the file of every imported module under the source roots."""
    roots = _source_roots()
    out = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name.split(".")[0] in roots and os.path.isfile(path):
            digest = _sha256(path)
            if digest:
                out[os.path.realpath(path)] = digest
    return out


def _stamp() -> dict:
    return {"python": sys.version.split()[0], "plugins": _plugins()}


def path_in(cache_dir: str) -> str:
    return os.path.join(cache_dir, FILE_NAME)


def _parse(data: object) -> Catalog:
    """The catalog in a parsed JSON document; ValueError/TypeError/KeyError if malformed."""
    if not isinstance(data, dict):
        raise TypeError("not an object")

    def strings(value) -> list[str]:
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise TypeError("not a list of strings")
        return list(value)

    def text(value) -> str:
        if not isinstance(value, str):
            raise TypeError("not a string")
        return value

    methods = []
    for m in data["methods"]:
        hps = [HyperparameterLine(*(text(h[k]) for k in ("name", "type", "default", "help")))
               for h in m["hyperparameters"]]
        applied = {text(s): {text(k): text(v) for k, v in values.items()}
                   for s, values in m["applied"].items()}
        methods.append(MethodEntry(text(m["name"]), text(m["kind"]), text(m["title"]),
                                   text(m["summary"]), hps, applied))
    suites = [SuiteEntry(text(s["name"]), text(s["family"]), strings(s["seen"]),
                         strings(s["unseen"])) for s in data["suites"]]
    return Catalog(methods, suites)


def _read(path: str) -> dict | None:
    """The JSON document at ``path`` if it is one of our catalogs, else None."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def load(cache_dir: str) -> Catalog:
    """The catalog: the cached one when everything it was built from is unchanged, else built
    now (importing every method and suite) and cached for the next call."""
    path = path_in(cache_dir)
    data = _read(path)
    if data is not None and data.get("stamp") == _stamp():
        sources = data.get("sources")
        if (isinstance(sources, dict) and sources
                and all(isinstance(v, str) and _sha256(k) == v for k, v in sources.items())):
            try:
                return _parse(data["catalog"])
            except (KeyError, TypeError, ValueError, AttributeError):
                pass
    catalog = build()
    _store(path, catalog)
    return catalog


def _store(path: str, catalog: Catalog) -> None:
    """Cache the catalog unless the cache cannot be written or something other than one of our
    catalogs holds the path (left alone, with a note on stderr: the listing stays uncached)."""
    from harness.io.files import write_json_atomic

    if os.path.lexists(path) and _read(path) is None:
        print(f"note: {path} is not a catalog this harness wrote, so `harness ls` cannot cache "
              "its listing there (remove the file to let it)", file=sys.stderr)
        return
    document = {"format": FORMAT, "stamp": _stamp(), "sources": _sources(),
                "catalog": asdict(catalog)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, document)
    except OSError:
        pass

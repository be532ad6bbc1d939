"""What the paper suites share: readable suite configs, checkpoint and dataset resolution.

Every paper suite is described by one TOML file in ``tasks/configs/`` (checkpoints, datasets,
splits, revisions, templates) that a user can copy, edit and pass with ``--suite-config``.
Wherever a hub name is accepted, a local folder (or, for data, local files) works too. Before any
long work, :func:`check_model` and :func:`check_dataset` say what is missing and how to provide it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import cached_property

from harness.io.files import UntrustedFileError, read_regular_file
from harness.tasks.base import Suite, SuiteUnavailableError, Task
from harness.tasks.embeddings import SentenceEncoder, default_minilm_dir

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

if sys.version_info >= (3, 11):
    import tomllib
else:                                                  # pragma: no cover
    import tomli as tomllib


MAX_CONFIG_BYTES = 1 << 20

# the types of the fields every suite reads (a suite may read more); anything else is kept as is
_STR, _STRS, _INT = "a string", "a list of strings", "a positive integer"
TOP_FIELDS = {"suite": _STR, "family": _STR, "pretrained": _STR, "unseen": _STRS,
              "batch_size": _INT, "max_examples": _INT, "max_length": _INT, "encoder": _STR,
              "checkpoint_format": _STR, "revision": _STR, "dtype": _STR,
              "task_embedding": _STR, "method_defaults": "a table of tables"}
TASK_FIELDS = {"checkpoint": _STR, "head": _STR, "dataset": _STR, "subset": _STR, "split": _STR,
               "revision": _STR, "dataset_revision": _STR, "subfolder": _STR,
               "description": _STR, "metric": _STR, "format": _STR, "image_column": _STR,
               "label_column": _STR, "lm_eval_task": _STR, "train_split": _STR,
               "labels": _STRS, "classnames": _STRS, "templates": _STRS, "text": _STRS,
               "data_files": "a string or a list of strings",
               "train_data_files": "a string or a list of strings", "max_examples": _INT}


def _fits(value, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == _INT:
        return type(value) is int and value > 0
    if kind == "a string or a list of strings":
        return _fits(value, _STR) or _fits(value, _STRS)
    if kind == "a table of tables":
        return isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())
    raise AssertionError(kind)


def check_config_types(config: dict, where: str) -> None:
    """Raise :class:`SuiteUnavailableError` naming the first field of a suite config whose type
    is wrong (``[tasks] cola = 1``, ``pretrained = 7``, ``unseen = "qqp"``...)."""
    for name, kind in TOP_FIELDS.items():
        if name in config and not _fits(config[name], kind):
            raise SuiteUnavailableError(f"suite config {where}: {name} must be {kind}, got "
                                        f"{config[name]!r}")
    tasks = config.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise SuiteUnavailableError(f"suite config {where} defines no [tasks.*]")
    for task, spec in tasks.items():
        if not isinstance(spec, dict):
            raise SuiteUnavailableError(f"suite config {where}: tasks.{task} must be a table "
                                        f"([tasks.{task}] with its fields), got {spec!r}")
        for name, kind in TASK_FIELDS.items():
            if name in spec and not _fits(spec[name], kind):
                raise SuiteUnavailableError(f"suite config {where}: tasks.{task}.{name} must "
                                            f"be {kind}, got {spec[name]!r}")


def load_config(suite: str, path: str | None = None) -> tuple[dict, str]:
    """(config, sha256 of its bytes) of ``path``, or of the suite's packaged default. The file
    must be a regular UTF-8 file of at most 1 MiB holding TOML of the expected types."""
    where = path or f"tasks/configs/{suite}.toml"
    if path is None:
        path_here = os.path.join(CONFIG_DIR, f"{suite}.toml")
        if not os.path.exists(path_here):
            raise SuiteUnavailableError(f"suite {suite!r} has no packaged config; pass one with "
                                        "--suite-config FILE")
        path = path_here
    try:
        blob = read_regular_file(path, "suite config", MAX_CONFIG_BYTES)
        text = blob.decode("utf-8")
    except FileNotFoundError:
        raise SuiteUnavailableError(f"suite config {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise SuiteUnavailableError(f"suite config {path} is not UTF-8 text (byte "
                                    f"{error.start})") from None
    except (OSError, UntrustedFileError) as error:
        raise SuiteUnavailableError(f"cannot read suite config {path}: {error}") from None
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SuiteUnavailableError(f"suite config {where}: {error}") from None
    if config.get("suite", suite) != suite:
        raise SuiteUnavailableError(
            f"{where} is a config for suite {config['suite']!r}, not {suite!r}")
    check_config_types(config, where)
    return config, hashlib.sha256(blob).hexdigest()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


class Problems:
    """The problems a suite's checks find, gathered so that one error lists them all (every
    missing checkpoint and dataset at once, not the first)."""

    def __init__(self, suite: str) -> None:
        self.suite = suite
        self.found: list[str] = []

    def check(self, check, *args, **kwargs) -> bool:
        """Run one check; False (and the problem kept) where it fails."""
        try:
            check(*args, **kwargs)
        except SuiteUnavailableError as error:
            self.found.append(str(error))
            return False
        return True

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise SuiteUnavailableError(self.found[0])
        if self.found:
            raise SuiteUnavailableError(f"suite {self.suite!r}: {len(self.found)} problems:\n  - "
                                        + "\n  - ".join(self.found))


def check_model(name: str, what: str, *, revision: str | None = None,
                subfolder: str = "") -> None:
    """Raise unless ``name`` (a folder or a hub name) can be loaded: a folder must hold a
    config.json; a hub name must be in the local hub cache when offline, or exist online."""
    if os.path.isdir(name) or name.startswith((".", "/", "~")):
        folder = os.path.join(os.path.expanduser(name), subfolder)
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise SuiteUnavailableError(
                f"{what}: no config.json in the local folder {folder} (a transformers "
                "save_pretrained folder is expected)")
        return
    from huggingface_hub import try_to_load_from_cache

    filename = os.path.join(subfolder, "config.json") if subfolder else "config.json"
    if isinstance(try_to_load_from_cache(name, filename, revision=revision), str):
        return
    if offline():
        raise SuiteUnavailableError(
            f"{what}: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
            f"Download it on a connected machine (`hf download {name}`; older huggingface_hub: `huggingface-cli download`) and copy the "
            "cache, or save it with save_pretrained and put the folder's path in the suite "
            "config (--suite-config)")
    from huggingface_hub import file_exists

    try:
        found = file_exists(name, filename, revision=revision)
    except Exception as error:                         # network errors of every kind
        raise SuiteUnavailableError(
            f"{what}: cannot reach the hub to find {name} ({type(error).__name__}: {error}); "
            "put a local folder in the suite config instead") from None
    if not found:
        raise SuiteUnavailableError(f"{what}: {name} has no {filename} on the hub")


def check_dataset(spec: dict, what: str) -> None:
    """Raise unless a task's dataset (local ``data_files`` or a hub ``dataset``) is reachable."""
    if "data_files" in spec:
        missing = [f for f in _as_list(spec["data_files"]) if not os.path.exists(f)]
        if missing:
            raise SuiteUnavailableError(f"{what}: data file {missing[0]} does not exist")
        return
    if "dataset" not in spec:
        raise SuiteUnavailableError(f"{what}: the config gives neither dataset nor data_files")
    if os.path.isdir(spec["dataset"]):
        return
    if offline():
        from huggingface_hub import scan_cache_dir

        try:
            cached = {repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "dataset"}
        except Exception:                              # no cache folder at all
            cached = set()
        if spec["dataset"] not in cached and not os.environ.get("HF_DATASETS_OFFLINE"):
            raise SuiteUnavailableError(
                f"{what}: dataset {spec['dataset']} is not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE is set; download it on a connected machine, or point data_files "
                "at local parquet/json/csv files in the suite config")


def load_split(spec: dict, cache_dir: str):
    """A task's evaluation split as a ``datasets.Dataset`` (hub name or local files), limited
    to ``max_examples`` when the config asks."""
    from datasets import load_dataset

    if "data_files" in spec:
        files = _as_list(spec["data_files"])
        kind = spec.get("format") or _format_of(files[0])
        data = load_dataset(kind, data_files={"test": files}, split="test", cache_dir=cache_dir)
    else:
        data = load_dataset(spec["dataset"], spec.get("subset"), split=spec.get("split", "test"),
                            revision=spec.get("dataset_revision"), cache_dir=cache_dir)
    limit = spec.get("max_examples")
    if limit and limit < len(data):
        data = data.select(range(int(limit)))
    return data


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _format_of(path: str) -> str:
    for suffix, kind in ((".parquet", "parquet"), (".jsonl", "json"), (".json", "json"),
                         (".csv", "csv")):
        if path.endswith(suffix):
            return kind
    raise SuiteUnavailableError(f"cannot tell the format of {path}: set format = ... in the "
                                "task's config (parquet, json or csv)")


class ConfiguredSuite(Suite):
    """A suite described by a TOML config (``tasks/configs/<name>.toml`` or ``--suite-config``):
    its tasks, unseen split, method defaults, datasets, and the result-file identity."""

    name = ""
    task_metric = "accuracy"

    def __init__(self, cache_dir: str | None = None, *, config: str | None = None,
                 encoder: str | None = None) -> None:
        super().__init__(cache_dir)
        self.config, self.config_sha256 = load_config(self.name, config)
        self.user_config = config
        self.family = self.config.get("family", "")
        self.specs: dict[str, dict] = self.config["tasks"]
        self.tasks = tuple(Task(n, tuple(s.get("labels", ())), s.get("description", n),
                                s.get("metric", self.task_metric))
                           for n, s in self.specs.items())
        self.unseen = tuple(self.config.get("unseen", ()))
        unknown = [t for t in self.unseen if t not in self.specs]
        if unknown:
            raise SuiteUnavailableError(f"{self.name}: unseen tasks {unknown} are not in [tasks]")
        self.method_defaults = self.config.get("method_defaults", {})
        self.encoder_name = encoder or self.config.get("encoder")
        self.folder = os.path.join(self.cache_dir, self.name)
        self._data: dict[str, object] = {}

    @cached_property
    def encoder(self) -> SentenceEncoder:
        """The sentence encoder of task embeddings: ``--encoder``, the config's ``encoder``, or
        the packaged MiniLM."""
        return SentenceEncoder(self.encoder_name or default_minilm_dir())

    def dataset(self, task: str):
        """The task's evaluation split, loaded once (``max_examples`` applies suite-wide)."""
        if task not in self._data:
            spec = {**self.specs[task]}
            if self.config.get("max_examples") and "max_examples" not in spec:
                spec["max_examples"] = self.config["max_examples"]
            self._data[task] = load_split(spec, os.path.join(self.folder, "datasets"))
        return self._data[task]

    def training_split(self, task: str):
        """The task's training split (``train_split``, default ``train``, or local
        ``train_data_files``), loaded once: fine-tuning's data, and the unlabeled inputs of
        merges that see data, which never see the split that is scored."""
        key = ("train", task)
        if key not in self._data:
            spec = self.specs[task]
            self._data[key] = load_split(
                {**spec, "split": spec.get("train_split", "train"),
                 **({"data_files": spec["train_data_files"]} if "train_data_files" in spec
                    else {})},
                os.path.join(self.folder, "datasets"))
        return self._data[key]

    def inputs_split(self, task: str, split: str):
        """Where the unlabeled inputs of a merge that sees data come from: the training split
        for ``validation`` (a paper suite scores its tasks on the split it calls test, GLUE's
        validation split), the scored split itself for ``test`` (AdaMerging, as its paper
        does)."""
        if split == "test":
            return self.dataset(task)
        spec = self.specs[task]
        if "data_files" in spec and "train_data_files" not in spec:
            raise SuiteUnavailableError(
                f"{self.name} task {task!r}: a merge that sees data needs unlabeled training "
                "inputs: give train_data_files = [...] in the suite config")
        return self.training_split(task)

    def identity(self) -> dict:
        return {"suite_config": self.config_sha256[:10]} if self.user_config else {}

    def provenance(self) -> dict:
        return {"suite": self.name, "config_sha256": self.config_sha256,
                "config": self.user_config or f"tasks/configs/{self.name}.toml",
                "pretrained": self.config["pretrained"],
                "checkpoints": {t: [s.get("checkpoint"), s.get("subfolder", "")]
                                for t, s in self.specs.items()}}


def dump_config(config: dict) -> str:
    """TOML text of a suite config (scalars and lists first, then one table per nested dict;
    JSON's string, number, boolean and array syntax is valid TOML)."""
    def value(v) -> str:
        return json.dumps(v)

    def table(prefix: str, body: dict) -> list[str]:
        lines = [f"{k} = {value(v)}" for k, v in body.items() if not isinstance(v, dict)]
        out = ([f"[{prefix}]", *lines, ""] if prefix and lines else [*lines, ""])
        for k, v in body.items():
            if isinstance(v, dict):
                out += table(f"{prefix}.{k}" if prefix else k, v)
        return out

    return "\n".join(table("", config))

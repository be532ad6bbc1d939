"""A :class:`~harness.engine.result.MergeResult` on disk: safetensors files and a protected manifest.

Layout of a stored result (a folder):

- ``base.safetensors``; ``shared-<name>.safetensors`` per shared state dict;
  ``task-<i>.safetensors`` per task with a payload (tensors ``<key>::<field>``, ``::scale``);
- ``manifest.json``, written last: the result's facts, each file's sha256, and the sha256 of the
  manifest's own canonical JSON (``manifest_sha256``).

Each safetensors file's header metadata binds it to its role (``base``, ``shared`` and its name,
``task`` and its name), so swapping two files' names in the manifest is an error, not another
task's weights. Loading checks, before any tensor is decoded: the manifest's own checksum, the
type and range of every field, that every file it names is a plain file inside the folder and
listed with its checksum, each file's checksum and binding, and that every stored codec fits
its key's shape. Every failure is a :class:`ResultFormatError` naming the file.

A save writes a work folder beside the target and moves it into place whole
(:class:`harness.io.files.WorkFolder`); it replaces only a folder that is itself a stored result
holding nothing the manifest does not list, and refuses anything else naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat

from torch import Tensor

from harness.engine.codecs import CodecError, TaskPayload, codec_class
from harness.io.files import (ReplaceRefusedError, UntrustedFileError, WorkFolder, clean_leftovers,
                              read_json_file, sha256_file)

FORMAT = "merge-harness-result"
FORMAT_VERSION = 2      # 2: the manifest carries its own checksum and each file is bound
MANIFEST = "manifest.json"
WORK_KIND = "tmp-result"
MAX_MANIFEST_BYTES = 256 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ResultFormatError(ValueError):
    """A stored result that cannot be read: corrupt, truncated, or from a newer version."""


def canonical_sha256(manifest: dict) -> str:
    """The sha256 of ``manifest`` (without ``manifest_sha256``) as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- writing --------------------------------------------------------------------------------
def save_result(result, directory: str) -> None:
    """Write ``result`` to ``directory`` (see the module docstring)."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    work = WorkFolder(directory, WORK_KIND)
    try:
        files: dict[str, str] = {}

        def write(name: str, tensors: dict[str, Tensor], binding: dict[str, str]) -> None:
            path = os.path.join(work.path, name)
            save_file({k: t.contiguous() for k, t in tensors.items()}, path,
                      metadata={"format": FORMAT, **binding})
            files[name] = sha256_file(path)

        write("base.safetensors", dict(result.base), {"role": "base"})
        for name, state in result.shared.items():
            write(f"shared-{name}.safetensors", dict(state), {"role": "shared", "name": name})
        task_entries = []
        for index, task in enumerate(result.tasks):
            entry: dict = {"name": task}
            payload = result.payloads.get(task)
            if payload is not None:
                tensors, records = {}, []
                for key, codec in payload.records.items():
                    for field_name, tensor in codec.tensors().items():
                        tensors[f"{key}::{field_name}"] = tensor
                    records.append({"key": key, "kind": codec.kind, "meta": codec.meta()})
                if payload.scale is not None:
                    tensors["::scale"] = payload.scale
                file_name = f"task-{index:03d}.safetensors"
                write(file_name, tensors, {"role": "task", "name": task})
                entry.update(file=file_name, records=records, shared=payload.shared)
            task_entries.append(entry)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "method": result.method,
            "hyperparameters": result.hyperparameters, "kind": result.kind,
            "tasks": task_entries, "shared": sorted(result.shared),
            "merged_params": result.merged_params, "accounting": result.accounting,
            "unseen": result.unseen, "info": result.info, "checksums": files,
        }
        manifest["manifest_sha256"] = canonical_sha256(manifest)
        with open(os.path.join(work.path, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        work.commit(check_replaceable)
    except BaseException:
        if not work.done:
            work.discard()
        raise


def check_replaceable(path: str) -> None:
    """Raise :class:`ReplaceRefusedError` unless ``path`` is a folder holding a stored result
    and nothing its manifest does not list."""
    if os.path.islink(path):
        raise ReplaceRefusedError(f"{path} is a symbolic link, not a stored result: not "
                                  "replaced")
    if not os.path.isdir(path):
        raise ReplaceRefusedError(f"{path} is a file, not a stored result: not replaced")
    try:
        manifest = read_json_file(os.path.join(path, MANIFEST), "manifest", MAX_MANIFEST_BYTES)
    except (OSError, UntrustedFileError):
        manifest = None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("checksums"), dict)
            or manifest.get("format", FORMAT) != FORMAT or "method" not in manifest):
        raise ReplaceRefusedError(f"{path} exists and is not a stored merge result (no "
                                  f"{MANIFEST} saying so): not replaced")
    extra = sorted(set(os.listdir(path)) - {MANIFEST, *manifest["checksums"]})
    if extra:
        raise ReplaceRefusedError(f"{path} holds {', '.join(extra[:3])}"
                                  + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
                                  + ", which its manifest does not list: not replaced")


# ---- reading --------------------------------------------------------------------------------
def load_result(cls, directory: str):
    """The result stored in ``directory``, after every check of the module docstring."""
    from safetensors import safe_open

    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.lexists(directory) and os.path.isdir(parent):
        clean_leftovers(parent, WORK_KIND)        # puts back a folder a killed save moved aside
    manifest_path = os.path.join(directory, MANIFEST)
    try:
        manifest = read_json_file(manifest_path, "manifest", MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ResultFormatError(f"{directory!r} holds no {MANIFEST}: not a stored result, or "
                                "an interrupted save") from None
    except (OSError, UntrustedFileError) as error:
        raise ResultFormatError(f"{manifest_path!r} is corrupt: {error}") from None
    check = _Checker(manifest_path)
    check.manifest(manifest)

    def verified(name: str) -> str:
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise ResultFormatError(f"{path!r} is missing from the stored result") from None
        if not stat.S_ISREG(info.st_mode):
            raise ResultFormatError(f"{path!r} is not a regular file")
        if sha256_file(path) != manifest["checksums"][name]:
            raise ResultFormatError(f"{path!r} does not match its checksum: the stored result "
                                    "is corrupt or truncated")
        return path

    def read(name: str, role: str, bound_to: str | None = None) -> dict[str, Tensor]:
        path = verified(name)
        try:
            with safe_open(path, "pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:          # a damaged safetensors file
            raise ResultFormatError(f"{path!r} is not a readable safetensors file: {error}") \
                from None
        if manifest["format_version"] >= 2:
            expected = {"format": FORMAT, "role": role,
                        **({"name": bound_to} if bound_to is not None else {})}
            if metadata != expected:
                raise ResultFormatError(f"{path!r} is bound to {metadata}, but the manifest "
                                        f"uses it as {expected}: files were swapped")
        return tensors

    base = read("base.safetensors", "base")
    shared = {n: read(f"shared-{n}.safetensors", "shared", n) for n in manifest["shared"]}
    payloads = {}
    for entry in manifest["tasks"]:
        if "file" not in entry:
            continue
        where = os.path.join(directory, entry["file"])
        tensors = read(entry["file"], "task", entry["name"])
        records, claimed = {}, set()
        for record in entry["records"]:
            key, prefix = record["key"], record["key"] + "::"
            mine = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            claimed.update(prefix + k for k in mine)
            try:
                codec = codec_class(record["kind"], manifest["method"]).from_stored(
                    record["meta"], mine)
            except CodecError as error:
                raise ResultFormatError(f"{where!r}, key {key!r}: {error}") from None
            if key not in base or tuple(base[key].shape) != tuple(codec.shape):
                raise ResultFormatError(f"{where!r}: key {key!r} decodes to shape "
                                        f"{tuple(codec.shape)}, which the base model does not "
                                        "have there")
            if record["kind"] == "mask":
                reference = shared.get(entry.get("shared") or "", {}).get(key)
                if reference is None or tuple(reference.shape) != tuple(codec.shape):
                    raise ResultFormatError(f"{where!r}: the mask of key {key!r} has no shared "
                                            "tensor of its shape to select from")
            records[key] = codec
        scale = tensors.get("::scale")
        if scale is not None:
            claimed.add("::scale")
            if scale.dim() != 0 or not scale.is_floating_point():
                raise ResultFormatError(f"{where!r}: the task scale is not a float scalar")
        unclaimed = sorted(set(tensors) - claimed)
        if unclaimed:
            raise ResultFormatError(f"{where!r} holds tensors no record names: {unclaimed[:3]}")
        payloads[entry["name"]] = TaskPayload(records, scale, entry.get("shared"))
    accounting = manifest.get("accounting")
    if accounting is None and manifest.get("paper_bits") is not None:     # format version 1
        accounting = {"paper_bits": manifest["paper_bits"]}
    return cls(method=manifest["method"], hyperparameters=manifest["hyperparameters"],
               base=base, tasks=[e["name"] for e in manifest["tasks"]], kind=manifest["kind"],
               payloads=payloads, shared=shared, merged_params=manifest["merged_params"],
               accounting=accounting or {}, unseen=manifest["unseen"], info=manifest["info"])


class _Checker:
    """Type and range checks of every manifest field, raising naming the manifest file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, problem: str):
        raise ResultFormatError(f"{self.path!r}: {problem}")

    def manifest(self, m) -> None:
        if not isinstance(m, dict):
            self.fail("the manifest is not a JSON object")
        version = m.get("format_version")
        if type(version) is not int or version < 1:
            self.fail(f"format_version {version!r} is not a positive integer")
        if version > FORMAT_VERSION:
            raise ResultFormatError(f"{os.path.dirname(self.path)!r} has format version "
                                    f"{version}, newer than this merge-harness reads "
                                    f"({FORMAT_VERSION}): upgrade merge-harness")
        known = {"format_version", "method", "hyperparameters", "kind", "tasks", "shared",
                 "merged_params", "unseen", "info", "checksums"}
        if version >= 2:
            known |= {"format", "accounting", "manifest_sha256"}
            if m.get("manifest_sha256") != canonical_sha256(m):
                self.fail("the manifest does not match its own checksum (manifest_sha256): it "
                          "was changed or damaged")
            if m.get("format") != FORMAT:
                self.fail(f"format {m.get('format')!r} is not {FORMAT!r}")
        else:
            known |= {"paper_bits"}
        if set(m) != known:
            missing, extra = sorted(known - set(m)), sorted(set(m) - known)
            self.fail(f"fields missing {missing} or unknown {extra}")
        if not isinstance(m["method"], str) or not m["method"]:
            self.fail("method is not a name")
        for name in ("hyperparameters", "unseen", "info"):
            if not isinstance(m[name], dict):
                self.fail(f"{name} is not an object")
        if m["kind"] not in ("shared", "personalized"):
            self.fail(f"kind {m['kind']!r} is not shared or personalized")
        merged = m["merged_params"]
        if type(merged) is not int or merged <= 0:
            self.fail(f"merged_params {merged!r} is not a positive integer")
        self.files(m)
        tasks = [e.get("name") if isinstance(e, dict) else None for e in m["tasks"]]
        self.unseen(m["unseen"], m["shared"])
        bits = m.get("paper_bits") if version < 2 else (m["accounting"] or {}).get("paper_bits")
        if version >= 2 and not isinstance(m["accounting"], dict):
            self.fail("accounting is not an object")
        if bits is not None and (not isinstance(bits, dict) or set(bits) != set(tasks) or any(
                not _number(v) or v < 0 for v in bits.values())):
            self.fail("paper_bits is not a non-negative number per task")

    def files(self, m) -> None:
        checksums, shared, tasks = m["checksums"], m["shared"], m["tasks"]
        if not isinstance(checksums, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
                for k, v in checksums.items()):
            self.fail("checksums is not a map of file names to sha256 digests")
        if not isinstance(shared, list) or not all(
                isinstance(n, str) and _NAME.fullmatch(n) for n in shared) \
                or len(set(shared)) != len(shared):
            self.fail("shared is not a list of distinct plain names")
        if not isinstance(tasks, list) or not tasks:
            self.fail("tasks is not a non-empty list")
        referenced = ["base.safetensors", *(f"shared-{n}.safetensors" for n in shared)]
        names = set()
        for entry in tasks:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                    or not entry["name"] or entry["name"] in names:
                self.fail("every task must have a distinct, non-empty name")
            names.add(entry["name"])
            if set(entry) not in ({"name"}, {"name", "file", "records", "shared"}):
                self.fail(f"task {entry['name']!r} has fields {sorted(entry)}")
            if "file" not in entry:
                if m["kind"] == "personalized":
                    self.fail(f"task {entry['name']!r} of a personalized result has no payload")
                continue
            if m["kind"] == "shared":
                self.fail(f"task {entry['name']!r} of a shared result has a payload")
            file_name = entry["file"]
            if not isinstance(file_name, str) or not re.fullmatch(r"task-\d{3,}\.safetensors",
                                                                  file_name):
                self.fail(f"task {entry['name']!r} names the file {file_name!r}, not a "
                          "task-<n>.safetensors file of this folder")
            referenced.append(file_name)
            if entry["shared"] is not None and entry["shared"] not in shared:
                self.fail(f"task {entry['name']!r} refers to a shared state dict "
                          f"{entry['shared']!r} that is not stored")
            self.records(entry)
        if sorted(referenced) != sorted(checksums) or len(set(referenced)) != len(referenced):
            self.fail(f"the files it uses ({sorted(referenced)}) and the files it checksums "
                      f"({sorted(checksums)}) differ")

    def records(self, entry: dict) -> None:
        records = entry["records"]
        if not isinstance(records, list):
            self.fail(f"task {entry['name']!r}: records is not a list")
        keys = set()
        for record in records:
            if not isinstance(record, dict) or set(record) != {"key", "kind", "meta"} \
                    or not isinstance(record["key"], str) or record["key"] in keys \
                    or "::" in record["key"] or not isinstance(record["kind"], str) \
                    or not isinstance(record["meta"], dict):
                self.fail(f"task {entry['name']!r}: a record is not a distinct key with a "
                          "codec kind and its metadata")
            keys.add(record["key"])

    def unseen(self, unseen: dict, shared: list) -> None:
        allowed = {"shared": lambda v: v in shared, "scale": _number,
                   "weighted": lambda v: isinstance(v, bool)}
        for name, value in unseen.items():
            if name not in allowed or not allowed[name](value):
                self.fail(f"unseen rule {name}={value!r} is not understood")


def _number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)

"""Reading the golden files written by ``scripts/fusionbench_golden.py`` and
``scripts/mergekit_golden.py`` (the same layout: inputs, each case's outputs, the cases and the
peer's wheel in the metadata)."""

import json

from safetensors import safe_open


def read_golden(path):
    """(cases, metadata, pretrained, finetuned, tensors) of the golden file at ``path``."""
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    tasks = json.loads(metadata["tasks"])
    pretrained = {k.split("/", 2)[2]: v for k, v in tensors.items()
                  if k.startswith("input/pretrained/")}
    finetuned = {t: {k.split("/", 2)[2]: v for k, v in tensors.items()
                     if k.startswith(f"input/{t}/")} for t in tasks}
    return json.loads(metadata["cases"]), metadata, pretrained, finetuned, tensors

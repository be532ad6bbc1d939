"""``vit-b32`` and ``vit-l14``: CLIP vision encoders on the paper's 8 image tasks.

Checkpoints and data are the public ones FusionBench uses: the
pretrained ``openai/clip-vit-*`` CLIPModel and one fine-tuned ``CLIPVisionModel`` per task,
loaded with transformers; the test split of each dataset, top-1 accuracy. Only the vision tower
is merged. Each task's head is zero-shot, built once from the pretrained CLIP text encoder: for
every class, the template texts are encoded and L2-normalized, averaged, normalized again, and
scaled by ``logit_scale.exp()``; the head normalizes the image feature and applies those rows
(the task_vectors recipe). The same rows give the unseen-task embeddings (spec: the CLIP text
encoder with the suite's templates). Everything is named in ``tasks/configs/<suite>.toml``.

``checkpoint_format = "open_clip"`` reads the paper's own checkpoints instead: open_clip image
encoders and heads pickled by the task_vectors code (``zeroshot.pt``, ``<Dataset>/finetuned.pt``,
``head_<Dataset>.pt``), merged on their own keys, heads read from the files
(``tasks/openclip_layout.py``; ``tasks/configs/vit-b32-open_clip.toml`` is an example).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property

import torch
from torch import Tensor

from harness.core.tensors import StateDict
from harness.tasks.base import Evaluation, SuiteUnavailableError, unit
from harness.tasks.hub import ConfiguredSuite, Problems, check_dataset, check_model
from harness.tasks.inputs import BackboneModule, TaskClassifier, call_with_pixels
from harness.tasks.openclip_layout import (read_head, read_module_state, to_transformers,
                                           vision_config, visual_state)

FORMATS = ("transformers", "open_clip")


def pooled(output) -> Tensor:
    """Features from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def tower(model):
    """The vision transformer inside a CLIPVisionModel (transformers 4 wraps it, 5 does not)."""
    return getattr(model, "vision_model", model)


class ClipSuite(ConfiguredSuite):
    """CLIP vision encoders, zero-shot heads from the CLIP text encoder; a config per suite."""

    name = "vit-b32"

    def __init__(self, cache_dir: str | None = None, *, config: str | None = None) -> None:
        super().__init__(cache_dir, config=config)
        self._heads: dict[str, Tensor] = {}
        self._biases: dict[str, Tensor | None] = {}
        self.format = self.config.get("checkpoint_format", "transformers")
        if self.format not in FORMATS:
            raise SuiteUnavailableError(f"{self.name}: checkpoint_format {self.format!r} is not "
                                        f"one of {', '.join(FORMATS)}")
        self._open_clip_config = None      # vision config of the first encoder read

    # ---- checks --------------------------------------------------------------------------
    def check(self) -> None:
        """Every checkpoint and dataset reachable, and every task model a vision tower of the
        pretrained model's shape, before anything long starts."""
        if self.format == "open_clip":
            return self._check_files()
        from transformers import AutoConfig

        base = self.config["pretrained"]
        problems = Problems(self.name)
        vision = None
        if problems.check(check_model, base, f"{self.name} pretrained model",
                          revision=self.config.get("revision")):
            vision = AutoConfig.from_pretrained(base, revision=self.config.get("revision"))
            vision = getattr(vision, "vision_config", vision)
        for task, spec in self.specs.items():
            found = problems.check(check_model, spec["checkpoint"], f"{self.name} task {task!r}",
                                   revision=spec.get("revision"))
            problems.check(check_dataset, spec, f"{self.name} task {task!r}")
            if not found or vision is None:
                continue
            theirs = AutoConfig.from_pretrained(spec["checkpoint"], revision=spec.get("revision"))
            theirs = getattr(theirs, "vision_config", theirs)
            for field in ("hidden_size", "num_hidden_layers", "patch_size", "image_size"):
                if getattr(theirs, field, None) != getattr(vision, field, None):
                    raise SuiteUnavailableError(
                        f"{self.name} task {task!r}: {spec['checkpoint']} has {field} = "
                        f"{getattr(theirs, field, None)}, the pretrained {base} has "
                        f"{getattr(vision, field, None)}: not fine-tuned from it")
        problems.raise_any()

    def provenance(self) -> dict:
        out = super().provenance()
        if self.format == "open_clip":
            out["heads"] = {task: spec.get("head") for task, spec in self.specs.items()}
        return out

    def _check_files(self) -> None:
        """The open_clip layout: every pickled encoder and head file exists."""
        files = [(self.config["pretrained"], "pretrained image encoder")]
        for task, spec in self.specs.items():
            check_dataset(spec, f"{self.name} task {task!r}")
            if "head" not in spec:
                raise SuiteUnavailableError(
                    f"{self.name} task {task!r}: checkpoint_format = \"open_clip\" needs head = "
                    "\"<folder>/head_<Dataset>.pt\" (the task_vectors ClassificationHead)")
            files += [(spec["checkpoint"], f"task {task!r} image encoder"),
                      (spec["head"], f"task {task!r} head")]
        for path, what in files:
            if not os.path.isfile(path):
                raise SuiteUnavailableError(
                    f"{self.name} {what}: no file {path} (the task_vectors layout: zeroshot.pt, "
                    "<Dataset>/finetuned.pt, head_<Dataset>.pt; download them from the authors' "
                    "folder and point the suite config at them)")

    # ---- models --------------------------------------------------------------------------
    @cached_property
    def clip(self):
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.config["pretrained"],
                                         revision=self.config.get("revision"),
                                         dtype=torch.float32).eval()

    def load_pretrained(self) -> StateDict:
        if self.format == "open_clip":
            return self._read_encoder(self.config["pretrained"])
        return dict(self.clip.vision_model.state_dict())

    def _read_encoder(self, path: str) -> StateDict:
        """An open_clip visual tower from a pickled task_vectors ImageEncoder."""
        checkpoint = read_module_state(path)
        visual = visual_state(checkpoint.state, path)
        if self._open_clip_config is None:
            self._open_clip_config = vision_config(visual, heads=self.config.get("attention_heads"),
                                                   hidden_act=checkpoint.activation)
        return visual

    def load_finetuned(self, task: str) -> StateDict:
        from transformers import CLIPVisionModel

        spec = self.specs[task]
        if self.format == "open_clip":
            return self._read_encoder(spec["checkpoint"])
        model = CLIPVisionModel.from_pretrained(spec["checkpoint"], revision=spec.get("revision"),
                                                dtype=torch.float32)
        return dict(tower(model).state_dict())

    # ---- heads ---------------------------------------------------------------------------
    def classnames(self, task: str) -> list[str]:
        """The config's ``classnames``, else the dataset's label names."""
        spec = self.specs[task]
        if "classnames" in spec:
            return list(spec["classnames"])
        feature = self.dataset(task).features[spec.get("label_column", "label")]
        if not hasattr(feature, "names"):
            raise SuiteUnavailableError(
                f"{self.name} task {task!r}: the label column has no class names; give "
                "classnames = [...] in the suite config")
        return [name.replace("_", " ") for name in feature.names]

    def head(self, task: str) -> Tensor:
        """The zero-shot head (classes x projection dim), cached on disk by its inputs."""
        if task in self._heads:
            return self._heads[task]
        from safetensors.torch import load_file, save_file

        spec = self.specs[task]
        if self.format == "open_clip":
            self._heads[task], self._biases[task] = read_head(spec["head"])
            return self._heads[task]
        names, templates = self.classnames(task), spec.get("templates", ["a photo of a {}."])
        key = hashlib.sha256(json.dumps([self.config["pretrained"], self.config.get("revision"),
                                         names, templates]).encode()).hexdigest()[:16]
        path = os.path.join(self.folder, "heads", f"{task}-{key}.safetensors")
        if os.path.exists(path):
            weight = load_file(path)["weight"]
        else:
            weight = self._build_head(names, templates)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file({"weight": weight.contiguous()}, path + ".tmp")
            os.replace(path + ".tmp", path)
        self._heads[task] = weight
        return weight

    @torch.no_grad()
    def _build_head(self, names: list[str], templates: list[str]) -> Tensor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.config["pretrained"],
                                                  revision=self.config.get("revision"))
        rows = []
        for name in names:
            texts = [template.format(name) for template in templates]
            encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            features = pooled(self.clip.get_text_features(**encoded))
            rows.append(unit(torch.stack([unit(f) for f in features]).mean(dim=0)))
        return torch.stack(rows) * self.clip.logit_scale.exp()

    def task_embedding(self, task: str) -> Tensor:
        """Mean of the unit class embeddings (templates averaged), renormalized."""
        return unit(torch.stack([unit(row) for row in self.head(task)]).mean(dim=0))

    # ---- exporting ------------------------------------------------------------------------
    exports = True
    HEAD_FILE = "zero_shot_head.safetensors"

    def export_state(self, task, backbone):
        """A ``CLIPModel``'s keys: the merged vision tower under ``vision_model.``, the rest (text
        tower, projections, logit scale) as the pretrained CLIP has them, so the zero-shot
        classifier of any class names can be rebuilt from the folder. Checkpoints in the
        open_clip layout have no text tower here: they export a
        ``CLIPVisionModelWithProjection`` (the converted tower and its projection)."""
        from harness.core.tensors import PrefixedState

        if self.format == "open_clip":
            converted = _Converted(backbone)
            return PrefixedState(("vision_model.", converted),
                                 ("visual_projection.", converted.projection))
        rest = {k: v for k, v in self.clip.state_dict().items()
                if not k.startswith("vision_model.")}
        return PrefixedState(("vision_model.", backbone), ("", rest))

    def export_files(self, task, folder):
        """The config (a task's class names as its labels), the image processor, the tokenizer
        (transformers layout), and the task's zero-shot head (classes x projection dim, logit
        scale included) as ``zero_shot_head.safetensors``, the exact classifier the suite
        scores with (its prompt templates averaged)."""
        from safetensors.torch import save_file

        # a copy of the config the suite evaluates with (open_clip's carries its projection
        # dimension, read from the checkpoint's shapes)
        source = self._vision.config if self.format == "open_clip" else self.clip.config
        config = type(source).from_dict(source.to_dict())
        config.architectures = ["CLIPVisionModelWithProjection" if self.format == "open_clip"
                                else "CLIPModel"]
        if task is not None:
            names = self.classnames(task)
            config.id2label = dict(enumerate(names))
            config.label2id = {n: i for i, n in enumerate(names)}
        config.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        if self.format != "open_clip":
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(self.config["pretrained"],
                                          revision=self.config.get("revision")
                                          ).save_pretrained(folder)
        if task is not None:
            tensors = {"weight": self.head(task).contiguous()}
            if self._biases.get(task) is not None:
                tensors["bias"] = self._biases[task].contiguous()
            save_file(tensors, os.path.join(folder, self.HEAD_FILE))

    # ---- evaluation ----------------------------------------------------------------------
    @cached_property
    def processor(self):
        from transformers import CLIPImageProcessor

        if self.format == "open_clip":                  # open_clip's val_preprocess
            size = self._vision.config.image_size
            return CLIPImageProcessor(size={"shortest_edge": size},
                                      crop_size={"height": size, "width": size})
        return CLIPImageProcessor.from_pretrained(self.config["pretrained"],
                                                  revision=self.config.get("revision"))

    @cached_property
    def _vision(self):
        """One vision tower, built once; each evaluation loads its backbone into it."""
        from transformers import CLIPVisionModel

        if self.format == "open_clip":
            if self._open_clip_config is None:    # no encoder read yet: read the pretrained one
                self.load_pretrained()
            return CLIPVisionModel(self._open_clip_config).eval()
        return CLIPVisionModel(self.clip.config.vision_config).eval()

    def _load_backbone(self, backbone: StateDict, device) -> tuple[object, Tensor]:
        """The evaluation tower holding ``backbone``, and the image projection weight."""
        model = self._vision
        if self.format == "open_clip":
            backbone, projection = to_transformers(dict(backbone))
        else:
            projection = self.clip.visual_projection.weight
        tower(model).load_state_dict(dict(backbone))
        return model.to(device), projection.to(device)

    @torch.no_grad()
    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        from tqdm.auto import tqdm

        spec = self.specs[task]
        model, projection = self._load_backbone(backbone, device)
        head = self.head(task).to(device)
        bias = self._biases.get(task)
        bias = None if bias is None else bias.to(device)
        data = self.dataset(task)
        image_column, label_column = spec.get("image_column", "image"), spec.get("label_column",
                                                                                 "label")
        classes = getattr(data.features[label_column], "num_classes", None)
        if classes is not None and classes != head.shape[0]:
            raise SuiteUnavailableError(
                f"{self.name} task {task!r}: the head has {head.shape[0]} classes, the dataset's "
                f"labels {classes}")
        size = int(self.config.get("batch_size", 64))
        correct = []
        for start in tqdm(range(0, len(data), size), desc=task, leave=False,
                          disable=not progress):
            batch = data[start:start + size]
            images = [image.convert("RGB") for image in batch[image_column]]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            logits = zero_shot_logits(model(pixel_values=pixels.to(device)).pooler_output,
                                      projection, head, bias)
            labels = torch.tensor(batch[label_column])
            correct.append((logits.argmax(dim=1).cpu() == labels).to(torch.uint8))
        scores = torch.cat(correct)
        return Evaluation("accuracy", int(scores.sum()) / len(data), examples=len(data),
                          outcomes={"score": scores})



    # ---- unlabeled inputs for merges that see data ----------------------------------------
    provides_inputs = True

    def _transformers_format(self) -> None:
        if self.format == "open_clip":
            raise SuiteUnavailableError(
                f"{self.name}: merges that see data address the backbone's modules by key, which "
                "the open_clip layout does not name as modules; use checkpoint_format = "
                "\"transformers\"")

    def unlabeled_inputs(self, task, split, count):
        """The first ``count`` images of the training split (``validation``) or the scored split
        (``test``), as evaluation preprocesses them: pixel values."""
        self._transformers_format()
        data = self.inputs_split(task, split)
        column = self.specs[task].get("image_column", "image")
        images = [image.convert("RGB") for image in data[:min(count, len(data))][column]]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def backbone_module(self, backbone: StateDict) -> torch.nn.Module:
        from transformers import CLIPVisionModel

        self._transformers_format()
        model = tower(CLIPVisionModel(self.clip.config.vision_config))
        model.load_state_dict(dict(backbone))
        return BackboneModule(model.eval(), call_with_pixels)

    def classifier_module(self, task: str, backbone: StateDict) -> torch.nn.Module:
        """The vision tower under ``backbone``; the logits evaluation computes (the projected,
        unit-normalised features against the zero-shot head, its bias if any)."""
        module = self.backbone_module(backbone)
        projection = self.clip.visual_projection.weight.detach()
        head, bias = self.head(task), self._biases.get(task)

        return TaskClassifier(module, {}, lambda batch: zero_shot_logits(
            module(batch).pooler_output, projection, head, bias))


class _Converted(dict):
    """An open_clip visual tower in transformers' names (``to_transformers``); ``projection``
    holds the image projection as ``{"weight": ...}``."""

    def __init__(self, visual) -> None:
        tower, projection = to_transformers(dict(visual))
        super().__init__(tower)
        self.projection = {"weight": projection.contiguous()}


def zero_shot_logits(pooled: Tensor, projection: Tensor, head: Tensor,
                     bias: Tensor | None) -> Tensor:
    """A CLIP classifier's logits: the vision tower's pooled output projected, unit-normalised
    and compared with the zero-shot head's rows (plus the head's bias, if it has one); what
    evaluation predicts from and what merges that see data differentiate."""
    logits = unit_rows(pooled @ projection.T) @ head.T
    return logits if bias is None else logits + bias


def unit_rows(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-12)


class VitB32Suite(ClipSuite):
    name = "vit-b32"


class VitL14Suite(ClipSuite):
    name = "vit-l14"

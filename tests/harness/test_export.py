"""Exported merges load with transformers' ``from_pretrained`` and compute what the merge serves.

The suite is offline-text's code on a small BERT built here (random weights, a word-piece vocab
written by the test) and task models put straight into its cache: the same formats as the real
MiniLM, no download."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from harness.bench.cli import main  # noqa: E402
from harness.core.registry import METHODS  # noqa: E402
from harness.io.files import ReplaceRefusedError  # noqa: E402
from harness.tasks.base import SuiteUnavailableError  # noqa: E402
from harness.tasks.offline_text import OfflineTextSuite  # noqa: E402
from harness.tasks.tiny import TinySuite  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "hotel", "was", "good", "bad",
         "room", "clean", "staff", "rude", "evidence", "supports", "claim", "big", "red", "ball"]
LABELS = {"sentiment-hotels": ["negative", "neutral", "positive"],
          "fact-verification": ["refutes", "supports", "unknown"],
          "adjective-order": ["correct", "wrong"],
          "intent-recognition": ["alarm", "music", "weather", "timer"],
          "sentiment-reviews": ["negative", "positive"]}


def small_bert(folder) -> None:
    """A 2-layer BERT and its word-piece tokenizer, saved as the MiniLM package ships them."""
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(WORDS) + "\n")
    transformers.BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    small_bert(str(root / "bert"))
    suite = OfflineTextSuite(str(root / "cache"), backbone_dir=str(root / "bert"))
    suite.data = lambda: {t: {"labels": labels} for t, labels in LABELS.items()}
    pretrained = dict(suite.load_pretrained())
    for index, (task, labels) in enumerate(LABELS.items()):
        torch.manual_seed(10 + index)
        model = suite._model(len(labels))
        model.base_model.load_state_dict({k: v + 0.02 * torch.randn_like(v)
                                          if v.is_floating_point() else v
                                          for k, v in pretrained.items()})
        suite.cache.put(f"task-{task}", {k: v.detach().clone()
                                         for k, v in model.state_dict().items()})
    return suite


def merged(suite, method, **hyperparameters):
    seen = suite.split_tasks("seen")
    return METHODS.get(method).create(**hyperparameters).merge(
        suite.load_pretrained(), {t: suite.load_finetuned(t) for t in seen})


def served_logits(suite, task, backbone, encoded):
    model = suite._model(len(LABELS[task]))
    model.base_model.load_state_dict(dict(backbone))
    model.classifier.load_state_dict(suite.head(task))
    return model.eval()(**encoded).logits


@pytest.mark.parametrize("method", ["ties", "dts-d"])
def test_each_exported_task_model_loads_and_matches_the_merge(suite, method, tmp_path):
    result = merged(suite, method)
    encoded = suite.tokenizer()(["the hotel was good", "red big ball claim"], padding=True,
                                return_tensors="pt")
    for task in suite.split_tasks("seen"):
        folder = result.export(tmp_path / task, suite, task, shard_bytes=20_000)
        index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1                                  # sharded, hub names
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, output_loading_info=True)
        assert not any(info.values()), info        # no missing, unexpected or mismatched key
        assert loaded.config.id2label == dict(enumerate(LABELS[task]))
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert tokenizer("the hotel")["input_ids"] == suite.tokenizer()("the hotel")["input_ids"]
        with torch.no_grad():
            expected = served_logits(suite, task, result.weights_for(task), encoded)
            assert torch.equal(loaded.eval()(**encoded).logits, expected)


def test_a_shared_merge_exports_one_backbone(suite, tmp_path):
    result = merged(suite, "task-arithmetic")
    folder = result.export(tmp_path / "backbone", suite)
    loaded, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, result.base[key]), key


def test_exports_refuse_what_they_cannot_do(suite, tmp_path):
    result = merged(suite, "emr")
    with pytest.raises(ValueError, match="personalized.*name a task"):
        result.export(tmp_path / "x", suite)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ReplaceRefusedError, match="project"):
        result.export(project, suite, "adjective-order")
    assert (project / "notes.txt").read_text() == "mine"
    again = result.export(tmp_path / "y", suite, "adjective-order")
    result.export(again, suite, "adjective-order")               # its own export: replaced
    with pytest.raises(SuiteUnavailableError, match="tiny.*no transformers model"):
        TinySuite().export_state("a-vs-b", {})


def test_cli_export_needs_a_task_or_all_tasks(capsys, tmp_path):
    assert main(["export", "--method", "ties", "--suite", "tiny", str(tmp_path / "out")]) == 2
    assert "--task T, or --all-tasks" in capsys.readouterr().err


def test_cli_export_of_tiny_says_it_has_no_transformers_format(tiny_cache, capsys, tmp_path):
    code = main(["export", "--method", "ties", "--suite", "tiny", "--task", "a-vs-b",
                 "--cache-dir", tiny_cache, "--quiet", str(tmp_path / "out")])
    assert code == 2
    assert "suite 'tiny' has no transformers model format" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_a_personalized_export_decodes_key_by_key(suite, tmp_path, monkeypatch):
    """The task's weights are never built whole (a model larger than memory streams)."""
    result = merged(suite, "dts-d")
    expected = result.weights_for("adjective-order")
    monkeypatch.setattr(type(result), "weights_for", lambda *a: pytest.fail("built whole"))
    folder = result.export(tmp_path / "streamed", suite, "adjective-order")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[f"bert.{key}"], value), key

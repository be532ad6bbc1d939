"""The qwen suite end to end on a tiny random Qwen2 causal LM (safetensors folders) and local
lm-eval multiple-choice tasks (YAML + JSON lines), through lm-eval's simple_evaluate on the
in-memory merged model. No network."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from harness.bench.cli import main
from harness.bench.records import read_records
from tests.tasks.test_paper_suites import perturbed, save_tokenizer  # noqa: E402

TASKS = {"mmlu": "which word is an animal", "truthfulqa": "which word is true",
         "bbq": "which word is good"}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    (root / "base").mkdir()
    vocab = save_tokenizer(root / "base", "qwen2")
    model_config = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=64, tie_word_embeddings=True,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = Qwen2ForCausalLM(model_config)
    base.save_pretrained(root / "base")
    (root / "lm_tasks").mkdir()
    lines = ['pretrained = ' + json.dumps(str(root / "base")), 'unseen = ["bbq"]',
             'dtype = "float32"', "batch_size = 4",
             "include_path = " + json.dumps(str(root / "lm_tasks")),
             "lm_eval_defaults = false"]
    for i, (task, question) in enumerate(TASKS.items()):
        model = Qwen2ForCausalLM(model_config)
        model.load_state_dict(perturbed(base.state_dict(), seed=i))
        model.save_pretrained(root / task)
        docs = [{"question": f"{question} ?", "choices": ["cat", "dog", "car"], "label": j % 3}
                for j in range(6)]
        (root / "lm_tasks" / f"{task}.jsonl").write_text(
            "\n".join(json.dumps(d) for d in docs) + "\n")
        (root / "lm_tasks" / f"{task}.yaml").write_text(
            f"task: tiny_{task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {root / 'lm_tasks' / (task + '.jsonl')}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
            "metric_list:\n  - metric: acc\n")
        lines += [f"[tasks.{task}]", "checkpoint = " + json.dumps(str(root / task)),
                  f'lm_eval_task = "tiny_{task}"', 'metric = "acc"',
                  f'description = "{question}"']
    path = root / "qwen.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("method", ["ties", "dts-d"])
def test_runs_end_to_end_through_lm_eval(method, config, tmp_path, capsys):
    results = str(tmp_path / "results")
    common = ["--method", method, "--suite", "qwen", "--suite-config", config,
              "--results", results, "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["validate", *common]) == 0, capsys.readouterr().err
    for split in ("seen", "unseen"):
        assert main(["run", *common, "--split", split]) == 0, capsys.readouterr().err
    records, _ = read_records(results)
    merged = {r.split: r for r in records if r.method == method}
    assert list(merged["seen"].tasks) == ["mmlu", "truthfulqa"]
    assert list(merged["unseen"].tasks) == ["bbq"]
    for record in merged.values():
        for score in record.tasks.values():
            assert score.metric == "acc" and score.examples == 6
            assert score.value in {k / 6 for k in range(7)}
    if method == "dts-d":
        gamma = merged["unseen"].gamma["bbq"]
        assert set(gamma) == {"mmlu", "truthfulqa"} and abs(sum(gamma.values()) - 1) < 1e-6


def test_the_packaged_config_says_checkpoints_are_missing(tmp_path, capsys):
    code = main(["validate", "--method", "ties", "--suite", "qwen", "--cache-dir",
                 str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "no checkpoint configured" in err or "not in the local Hugging Face cache" in err

"""The paper suites (vit-b32, vit-l14, roberta-glue, gpt2-glue) end to end on tiny random models of
the real architectures and tiny datasets, saved in the real on-disk formats (transformers
save_pretrained folders, Hugging Face parquet with ClassLabel features), pointed at by an edited
copy of each suite's config. No network."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("PIL")

from harness.bench.cli import main  # noqa: E402
from harness.bench.records import read_records  # noqa: E402
from harness.tasks.base import SuiteUnavailableError  # noqa: E402
from harness.tasks.hub import load_config  # noqa: E402

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "the", "of", "photo", "number", "texture",
         "good", "bad", "yes", "no", "is", "it", "cat", "dog", "sign", "car"]
N = 16                                                   # examples per task


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


CORPUS = [" ".join(WORDS[4:]), "which word is an animal ? which word is true ? cat dog car",
          "the number texture photo of a sign is good bad yes no it"]
BPE_CLASSES = {"gpt2": "GPT2Tokenizer", "roberta": "RobertaTokenizer", "qwen2": "Qwen2Tokenizer"}


def save_tokenizer(folder, kind):
    """A small tokenizer of the model's own class (so AutoTokenizer loads it as it would load
    the real one): byte-level BPE trained here for GPT-2, RoBERTa and Qwen2; CLIP's BPE over
    single characters. Returns its vocabulary size."""
    import transformers

    if kind == "clip":
        from transformers import CLIPTokenizer

        chars = sorted(set("".join(CORPUS).replace(" ", "")))
        vocab = {c: i for i, c in enumerate(chars)}
        vocab |= {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
        vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    else:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                                special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
        bpe.save_model(str(folder))
        merges = [tuple(line.split()) for line in
                  (folder / "merges.txt").read_text().splitlines()[1:] if line]
        vocab = json.loads((folder / "vocab.json").read_text())
        tokenizer = getattr(transformers, BPE_CLASSES[kind])(
            vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
            pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def perturbed(state, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in state.items()}


def write_toml(path, base, tasks):
    """An edited copy of a suite config: the packaged one with names replaced by local paths
    (JSON strings, numbers and arrays are valid TOML values)."""
    lines = [f"pretrained = {json.dumps(base)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in tasks["_config"].items()]
    for name, spec in tasks.items():
        if name != "_config":
            lines.append(f"[tasks.{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in spec.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---- CLIP ----------------------------------------------------------------------------------
def build_clip_suite(root, suite):
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    base = root / "clip-base"
    base.mkdir()
    vocab = save_tokenizer(base, "clip")
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=8)
    model = CLIPModel(config)
    model.save_pretrained(base)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(base)
    packaged, _ = load_config(suite)
    tasks = {"_config": {"suite": suite, "unseen": packaged["unseen"], "batch_size": 8}}
    rng = np.random.default_rng(0)
    for i, (name, spec) in enumerate(packaged["tasks"].items()):
        vision = CLIPVisionModel(config.vision_config)
        getattr(vision, "vision_model", vision).load_state_dict(
            perturbed(model.vision_model.state_dict(), seed=i))
        vision.save_pretrained(root / f"clip-{name}")
        images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
                  for _ in range(N)]
        data = datasets.Dataset.from_dict(
            {"image": images, "label": [j % 3 for j in range(N)]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=["cat", "dog",
                                                                            "car"])}))
        data.to_parquet(str(root / f"{name}.parquet"))
        tasks[name] = {"checkpoint": str(root / f"clip-{name}"),
                       "data_files": str(root / f"{name}.parquet"),
                       "train_data_files": str(root / f"{name}.parquet"),
                       "templates": spec["templates"][:2],
                       "description": spec["description"]}
    return write_toml(root / f"{suite}.toml", str(base), tasks)


# ---- GLUE ----------------------------------------------------------------------------------
def build_glue_suite(root, suite):
    from transformers import (AutoModel, AutoModelForSequenceClassification, GPT2Config,
                              RobertaConfig)

    torch.manual_seed(0)
    base = root / f"{suite}-base"
    base.mkdir()
    vocab = save_tokenizer(base, "roberta" if suite == "roberta-glue" else "gpt2")
    if suite == "roberta-glue":
        config = RobertaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=40, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2,
                            n_positions=40, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    backbone = AutoModel.from_config(config)
    backbone.save_pretrained(base)
    packaged, _ = load_config(suite)
    tasks = {"_config": {"suite": suite, "unseen": packaged["unseen"], "batch_size": 8,
                         "max_length": 16}}
    rng = np.random.default_rng(0)
    for i, (name, spec) in enumerate(packaged["tasks"].items()):
        labels = len(spec.get("labels", [])) or 1
        task_config = config.__class__.from_dict({**config.to_dict(), "num_labels": labels})
        model = AutoModelForSequenceClassification.from_config(task_config)
        model.base_model.load_state_dict(perturbed(
            {k: v for k, v in backbone.state_dict().items()
             if k in model.base_model.state_dict()}, seed=i), strict=False)
        model.save_pretrained(root / f"{suite}-{name}")
        columns = {c: [" ".join(rng.choice(WORDS[4:], 5)) for _ in range(N)]
                   for c in spec["text"]}
        label = ([float(x) for x in rng.uniform(0, 5, N)] if labels == 1
                 else [j % labels for j in range(N)])
        datasets.Dataset.from_dict({**columns, "label": label}).to_parquet(
            str(root / f"{suite}-{name}.parquet"))
        tasks[name] = {"checkpoint": str(root / f"{suite}-{name}"),
                       "data_files": str(root / f"{suite}-{name}.parquet"),
                       "train_data_files": str(root / f"{suite}-{name}.parquet"),
                       "text": spec["text"], "metric": spec.get("metric", "accuracy"),
                       "labels": spec.get("labels", []), "description": spec["description"]}
    return write_toml(root / f"{suite}.toml", str(base), tasks)


BUILDERS = {"vit-b32": build_clip_suite, "vit-l14": build_clip_suite,
            "roberta-glue": build_glue_suite, "gpt2-glue": build_glue_suite}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-suites")
    out = {}
    for suite, build in BUILDERS.items():
        (root / suite).mkdir()
        out[suite] = build(root / suite, suite)
    return out


def harness(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_both_splits(capsys, method, suite, config, tmp_path, *extra) -> list[dict]:
    """``harness validate``, then ``harness run`` on the seen and unseen splits; the method's
    result records."""
    results = str(tmp_path / "results")
    common = ["--method", method, "--suite", suite, "--suite-config", config,
              "--results", results, "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra]
    code, out, err = harness(capsys, "validate", *common)
    assert code == 0, err
    for split in ("seen", "unseen"):
        code, out, err = harness(capsys, "run", *common, "--split", split)
        assert code == 0, err
    records, _ = read_records(results)
    return [r for r in records if r.method == method]


@pytest.mark.parametrize("suite", sorted(BUILDERS))
@pytest.mark.parametrize("method", ["ties", "dts-d"])
def test_runs_end_to_end(suite, method, configs, tmp_path, capsys):
    merged = run_both_splits(capsys, method, suite, configs[suite], tmp_path)
    config, _ = load_config(suite, configs[suite])
    assert {r.split for r in merged} == {"seen", "unseen"}
    for record in merged:
        names = (config["unseen"] if record.split == "unseen" else
                 [t for t in config["tasks"] if t not in config["unseen"]])
        assert record.task_order == names
        for task, score in record.tasks.items():
            metric = config["tasks"][task].get("metric", "accuracy")
            assert score.metric == metric
            low = -1.0 if metric in ("mcc", "pearson_spearman") else 0.0
            assert low <= score.value <= 1.0
        assert record.provenance["suite"]["config"] == configs[suite]
    if method == "dts-d":
        unseen = next(r for r in merged if r.split == "unseen")
        for weights in unseen.gamma.values():
            assert abs(sum(weights.values()) - 1) < 1e-6


@pytest.mark.parametrize("suite", ["vit-b32", "roberta-glue", "gpt2-glue"])
def test_inputs_for_merges_that_see_data(suite, configs, tmp_path, capsys):
    """Training-split inputs (the scored split for AdaMerging), no labels; each task's classifier
    gives the logits evaluation predicts from; the data methods run and record what they saw."""
    from harness.core.registry import SUITES

    prepared = SUITES.get(suite)(str(tmp_path / "cache"), config=configs[suite])
    tasks = prepared.split_tasks("seen")
    data = prepared.task_inputs(tasks, examples=5, batch_size=4)
    assert data.split == "validation" and [len(b) for b in data.batches[tasks[0]]] == [4, 1]
    task = next(t for t in tasks if prepared.specs[t].get("metric") != "pearson_spearman")
    finetuned = prepared.load_finetuned(task)
    model = data.task_model(task, finetuned)
    batch = torch.cat(data.batches[task]) if suite == "vit-b32" else data.batches[task][0]
    with torch.no_grad():
        logits = model(batch)
    if suite == "vit-b32":
        from harness.tasks.clip import unit_rows

        vision, projection = prepared._load_backbone(finetuned, "cpu")
        with torch.no_grad():
            features = vision(pixel_values=batch).pooler_output @ projection.T
        expected = unit_rows(features) @ prepared.head(task).T
    else:
        reference = prepared.task_model(task)
        with torch.no_grad():
            expected = reference(input_ids=batch[:, 0], attention_mask=batch[:, 1]).logits
    assert torch.allclose(logits, expected, atol=1e-5)
    assert "backbone." + next(iter(finetuned)) in dict(model.named_parameters())
    assert prepared.task_inputs(tasks, examples=2, batch_size=2, split="test").split == "test"
    for method in ("regmean", "fisher"):
        records = run_both_splits(capsys, method, suite, configs[suite], tmp_path,
                                  "--set", "examples=6", "--set", "batch_size=4")
        seen = next(r for r in records if r.split == "seen")
        assert seen.merge_info["data"]["examples"] == {t: 6 for t in seen.task_order}
        if method == "regmean":
            assert seen.merge_info["regmean_layers"]            # the hooks found linear layers


def test_glue_metrics_follow_the_spec(configs, tmp_path):
    from harness.tasks.glue import RobertaGlueSuite

    suite = RobertaGlueSuite(str(tmp_path), config=configs["roberta-glue"])
    backbone = suite.load_finetuned("stsb")
    result = suite.evaluate("stsb", backbone)
    assert result.metric == "pearson_spearman"
    assert set(result.extras) == {"pearson", "spearman"}
    assert result.value == pytest.approx((result.extras["pearson"] + result.extras["spearman"])
                                         / 2)
    cola = suite.evaluate("cola", suite.load_finetuned("cola"))
    assert cola.metric == "mcc" and "accuracy" in cola.extras


def test_classifier_head_embeddings(configs, tmp_path):
    """The authors' RoBERTa option: cosine of the fine-tuned classifier.dense weights."""
    from harness.tasks.glue import RobertaGlueSuite

    suite = RobertaGlueSuite(str(tmp_path), config=configs["roberta-glue"])
    suite.embedding = "classifier-head"
    head = suite.task_model("rte").state_dict()
    expected = torch.cat([head["classifier.dense.bias"].flatten(),
                          head["classifier.dense.weight"].flatten()])
    expected = expected / expected.norm()
    assert torch.allclose(suite.task_embedding("rte"), expected)


def test_clip_heads_are_the_zero_shot_recipe(configs, tmp_path):
    from harness.tasks.clip import VitB32Suite, pooled

    suite = VitB32Suite(str(tmp_path), config=configs["vit-b32"])
    head = suite.head("mnist")
    templates = suite.specs["mnist"]["templates"]
    assert head.shape == (3, 8)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(suite.config["pretrained"])
    with torch.no_grad():
        feats = pooled(suite.clip.get_text_features(**tokenizer(
            [t.format("dog") for t in templates], padding=True, return_tensors="pt")))
    row = torch.nn.functional.normalize(feats, dim=-1).mean(0)
    row = row / row.norm() * suite.clip.logit_scale.exp()
    assert torch.allclose(head[1], row, atol=1e-5)
    embedding = suite.task_embedding("mnist")
    assert abs(float(embedding.norm()) - 1) < 1e-5


def test_validate_names_what_is_missing(configs, tmp_path, capsys):
    text = open(configs["gpt2-glue"]).read().replace('gpt2-glue-qnli"', 'gpt2-glue-gone"')
    broken = tmp_path / "broken.toml"
    broken.write_text(text)
    code, _, err = harness(capsys, "validate", "--method", "ties", "--suite", "gpt2-glue",
                           "--suite-config", str(broken), "--cache-dir", str(tmp_path))
    assert code == 2 and "task 'qnli'" in err and "no config.json" in err
    code, _, err = harness(capsys, "validate", "--method", "ties", "--suite", "vit-b32",
                           "--suite-config", configs["gpt2-glue"], "--cache-dir", str(tmp_path))
    assert code == 2 and "not 'vit-b32'" in err


def test_hub_names_offline_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from harness.tasks.clip import VitB32Suite

    with pytest.raises(SuiteUnavailableError, match="not in the local Hugging Face cache"):
        VitB32Suite(str(tmp_path)).check()


def test_a_suite_without_configs_refuses_the_flag(tmp_path, capsys):
    code, _, err = harness(capsys, "validate", "--method", "ties", "--suite", "tiny",
                           "--suite-config", "x.toml", "--cache-dir", str(tmp_path))
    assert code == 2 and "takes no --suite-config" in err


def test_finetune_produces_task_models_and_a_config_that_runs(configs, tmp_path, capsys):
    """`harness finetune --suite roberta-glue` trains every task from the pretrained model and
    writes a config pointing at the results, which `harness run` then uses."""
    config = tmp_path / "roberta.toml"
    config.write_text(open(configs["roberta-glue"]).read() +
                      "[finetune]\nmax_steps = 2\nbatch_size = 4\nlr = 0.001\n")
    cache = tmp_path / "cache"
    code, out, err = harness(capsys, "finetune", "--suite", "roberta-glue", "--suite-config",
                             str(config), "--cache-dir", str(cache), "--quiet")
    assert code == 0, err
    written = cache / "roberta-glue" / "finetuned" / "roberta-glue.toml"
    assert str(written) in out
    produced, _ = load_config("roberta-glue", str(written))
    assert produced["tasks"]["cola"]["checkpoint"] == str(cache / "roberta-glue" / "finetuned" /
                                                          "cola")
    original, _ = load_config("roberta-glue", str(config))
    assert produced["unseen"] == original["unseen"] and produced["finetune"] == original[
        "finetune"]
    assert produced["tasks"]["stsb"]["metric"] == original["tasks"]["stsb"]["metric"]
    from harness.tasks.glue import RobertaGlueSuite

    suite = RobertaGlueSuite(str(cache), config=str(written))
    pretrained, tuned = suite.load_pretrained(), suite.load_finetuned("stsb")
    assert any(not torch.equal(pretrained[k], tuned[k]) for k in pretrained)
    assert suite.task_model("stsb").config.num_labels == 1
    code, _, err = harness(capsys, "run", "--method", "ties", "--suite", "roberta-glue",
                           "--suite-config", str(written), "--cache-dir", str(cache),
                           "--results", str(tmp_path / "results"), "--quiet")
    assert code == 0, err


@pytest.mark.parametrize("suite", ["vit-b32", "vit-l14", "roberta-glue", "gpt2-glue", "qwen"])
def test_packaged_configs_round_trip_through_the_writer(suite, tmp_path):
    from harness.tasks.hub import dump_config

    config, _ = load_config(suite)
    path = tmp_path / f"{suite}.toml"
    path.write_text(dump_config(config))
    assert load_config(suite, str(path))[0] == config

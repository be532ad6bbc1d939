"""The paper's own CLIP checkpoint layout (``checkpoint_format = "open_clip"``): tiny modules with
open_clip's and task_vectors' class names and attribute trees, pickled whole with torch.save into
zeroshot.pt / <Dataset>/finetuned.pt / head_<Dataset>.pt, read back with those classes gone."""

import os
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("PIL")

from harness.tasks.base import SuiteUnavailableError  # noqa: E402
from harness.tasks.clip import VitB32Suite  # noqa: E402
from harness.tasks.openclip_layout import read_module_state, to_transformers, visual_state  # noqa: E402
from tests.tasks.test_paper_suites import harness, run_both_splits  # noqa: E402

WIDTH, HEADS, LAYERS, PATCH, SIZE, EMBED = 16, 2, 2, 8, 16, 8
TASKS = {"mnist": "MNIST", "svhn": "SVHN", "dtd": "DTD"}


# ---- stand-ins for open_clip and task_vectors, as their pickles name them ------------------
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.ls_1, self.ls_2 = nn.Identity(), nn.Identity()
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(WIDTH, 4 * WIDTH)),
                                              ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * WIDTH, WIDTH))]))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock() for _ in range(LAYERS))


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        grid = SIZE // PATCH
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, WIDTH))
        self.ln_pre, self.ln_post = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.transformer = Transformer()
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = VisionTransformer()
        self.token_embedding = nn.Embedding(20, WIDTH)        # text leftovers, never fine-tuned
        self.positional_embedding = nn.Parameter(torch.randn(7, WIDTH))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))


def convert_to_rgb(image):
    return image


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms


class ImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = CLIP()
        self.val_preprocess = Compose([convert_to_rgb])


class ClassificationHead(nn.Linear):
    def __init__(self, normalize, weights):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(torch.zeros_like(self.bias))


class RunsACommand:
    """What a hostile pickle would hold: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


MODULES = {"open_clip.model": [CLIP], "open_clip.transformer": [
    VisionTransformer, Transformer, ResidualAttentionBlock, QuickGELU],
    "open_clip.transform": [convert_to_rgb], "torchvision.transforms.transforms": [Compose],
    "src.modeling": [ImageEncoder], "src.heads": [ClassificationHead]}


@pytest.fixture
def foreign_classes(monkeypatch):
    """The classes registered under open_clip's and task_vectors' module names while saving."""
    for name, members in MODULES.items():
        module = types.ModuleType(name)
        for member in members:
            member.__module__ = name
            setattr(module, member.__name__, member)
        monkeypatch.setitem(sys.modules, name, module)
        parent = name.rpartition(".")[0]
        while parent and parent not in sys.modules:
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
            parent = parent.rpartition(".")[0]
    yield
    for name, members in MODULES.items():
        for member in members:
            member.__module__ = __name__


def perturb(encoder, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.model.visual.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
    return encoder


@pytest.fixture
def layout(tmp_path, foreign_classes):
    """A task_vectors checkpoint folder, tiny parquet data, and a suite config pointing at them."""
    from PIL import Image

    torch.manual_seed(0)
    folder = tmp_path / "checkpoints" / "ViT-B-32"
    folder.mkdir(parents=True)
    base = ImageEncoder().eval()
    torch.save(base, folder / "zeroshot.pt")
    rng = np.random.default_rng(0)
    lines = ['suite = "vit-b32"', 'checkpoint_format = "open_clip"',
             f'pretrained = "{folder / "zeroshot.pt"}"', 'unseen = ["svhn"]', "batch_size = 4",
             f"attention_heads = {HEADS}"]
    encoders = {}
    for seed, (task, dataset) in enumerate(TASKS.items(), start=1):
        (folder / dataset).mkdir()
        encoders[task] = perturb(torch.load(folder / "zeroshot.pt", weights_only=False), seed)
        torch.save(encoders[task], folder / dataset / "finetuned.pt")
        head = ClassificationHead(True, torch.randn(3, EMBED, generator=torch.Generator()
                                                    .manual_seed(10 + seed)))
        torch.save(head, folder / f"head_{dataset}.pt")
        images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
                  for _ in range(8)]
        datasets.Dataset.from_dict(
            {"image": images, "label": [j % 3 for j in range(8)]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=["a", "b", "c"])})
        ).to_parquet(str(tmp_path / f"{task}.parquet"))
        lines += [f"[tasks.{task}]", f'checkpoint = "{folder / dataset / "finetuned.pt"}"',
                  f'head = "{folder / f"head_{dataset}.pt"}"',
                  f'data_files = "{tmp_path / f"{task}.parquet"}"']
    config = tmp_path / "vit-b32-open_clip.toml"
    config.write_text("\n".join(lines) + "\n")
    return types.SimpleNamespace(config=str(config), folder=folder, base=base, encoders=encoders)


def test_reads_a_pickled_image_encoder_without_its_classes(layout, monkeypatch):
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "src")
    checkpoint = read_module_state(str(layout.folder / "MNIST" / "finetuned.pt"))
    assert checkpoint.activation == "quick_gelu"
    expected = layout.encoders["mnist"].state_dict()
    assert set(checkpoint.state) == set(expected)
    assert all(torch.equal(checkpoint.state[k], expected[k]) for k in expected)
    visual = visual_state(checkpoint.state, "finetuned.pt")
    assert "conv1.weight" in visual and "token_embedding.weight" not in visual
    assert all(torch.equal(visual[k], expected[f"model.visual.{k}"]) for k in visual)


def test_transformers_tower_computes_the_open_clip_features(layout):
    suite = VitB32Suite(config=layout.config)
    backbone = suite.load_finetuned("dtd")
    model, projection = suite._load_backbone(backbone, "cpu")
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = layout.encoders["dtd"].model.visual(pixels)
        ours = model(pixel_values=pixels).pooler_output @ projection.T
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_in_proj_is_split_into_query_key_value():
    visual = {"transformer.resblocks.0.attn.in_proj_weight": torch.arange(12.).view(6, 2),
              "proj": torch.zeros(2, 1)}
    tower, projection = to_transformers(visual)
    assert torch.equal(tower["encoder.layers.0.self_attn.k_proj.weight"],
                       torch.tensor([[4., 5.], [6., 7.]]))
    assert projection.shape == (1, 2)
    with pytest.raises(SuiteUnavailableError, match="attn_pool"):
        to_transformers({"attn_pool.weight": torch.zeros(1), "proj": torch.zeros(2, 1)})


def test_a_hostile_pickle_runs_nothing(tmp_path, foreign_classes):
    marker = tmp_path / "ran"
    module = ImageEncoder()
    module.val_preprocess = RunsACommand(marker)
    torch.save(module, tmp_path / "hostile.pt")
    checkpoint = read_module_state(str(tmp_path / "hostile.pt"))
    assert not marker.exists()
    assert "model.visual.proj" in checkpoint.state


def test_bad_files_are_named(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SuiteUnavailableError, match="corrupt.pt is not in torch.save.s zip format"):
        read_module_state(str(tmp_path / "corrupt.pt"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(SuiteUnavailableError, match="no open_clip visual tower"):
        visual_state(read_module_state(str(tmp_path / "plain.pt")).state, "plain.pt")


def test_validate_names_a_missing_head_or_file(layout, tmp_path, capsys):
    common = ["--method", "ties", "--suite", "vit-b32", "--cache-dir", str(tmp_path)]
    broken = tmp_path / "no-head.toml"
    broken.write_text(open(layout.config).read().replace(
        f'head = "{layout.folder / "head_DTD.pt"}"\n', ""))
    code, _, err = harness(capsys, "validate", *common, "--suite-config", str(broken))
    assert code == 2 and "task 'dtd'" in err and "needs head =" in err
    os.remove(layout.folder / "SVHN" / "finetuned.pt")
    code, _, err = harness(capsys, "validate", *common, "--suite-config", layout.config)
    assert code == 2 and "SVHN/finetuned.pt" in err


@pytest.mark.parametrize("method", ["ties", "dts-d"])
def test_runs_end_to_end_on_the_open_clip_layout(layout, tmp_path, method, capsys):
    records = run_both_splits(capsys, method, "vit-b32", layout.config, tmp_path)
    merged = {r.split: r for r in records}
    assert merged["seen"].task_order == ["mnist", "dtd"]
    assert merged["unseen"].task_order == ["svhn"]
    for record in merged.values():
        assert all(0 <= score.value <= 1 for score in record.tasks.values())
    suite = merged["seen"].provenance["suite"]
    assert suite["checkpoints"]["dtd"][0].endswith("DTD/finetuned.pt")
    assert suite["heads"]["dtd"].endswith("head_DTD.pt")


def vit_b32_visual_shapes(width=768, layers=12, grid=7, patch=32, embed=512):
    """open_clip ViT-B-32's visual tower, tensor by tensor."""
    shapes = [(width,), (grid * grid + 1, width), (width, embed), (width, 3, patch, patch),
              (width,), (width,), (width,), (width,)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width),
                   (width,), (width,), (width,), (4 * width, width), (4 * width,),
                   (width, 4 * width), (width,)]
    return shapes


def test_paper_amr_on_open_clip_keys_matches_the_notes():
    """The authors' count: 3.92% at r=0.3 over the visual tower (87.85 M parameters);
    3.68% with the text leftovers the authors' loop also counts (Table 1's DTS AMR)."""
    from harness.methods.dts import dts_paper_amr

    visual = vit_b32_visual_shapes()
    assert sum(np.prod(s) for s in visual) == 87_849_216
    assert round(dts_paper_amr(visual, 0.3), 2) == 3.92
    assert round(dts_paper_amr(visual, 0.01), 2) == 0.38
    leftovers = [(49408, 512), (77, 512), (512,), (512,), (512, 512), ()]
    assert round(dts_paper_amr(visual + leftovers, 0.3), 2) == 3.68


def test_a_head_that_does_not_fit_the_labels_is_named(layout, foreign_classes):
    torch.save(ClassificationHead(True, torch.randn(5, EMBED)), layout.folder / "head_DTD.pt")
    suite = VitB32Suite(config=layout.config)
    with pytest.raises(SuiteUnavailableError, match="head has 5 classes, the dataset's labels 3"):
        suite.evaluate("dtd", suite.load_finetuned("dtd"))


def test_a_crafted_checkpoint_runs_no_code_end_to_end(layout, tmp_path, capsys):
    """The reported exploit: a dotted global reaching ``exec``, inside a torch zip, named by a
    suite config; ``validate`` passes (it reads no weights) and ``run`` refuses the file."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()".encode()
    pickled = (b"\x80\x04ctorch._utils\n_rebuild_tensor.__builtins__.get\n(X\x04\x00\x00\x00"
               b"exectR(X" + len(code).to_bytes(4, "little") + code + b"tR.")
    hostile = layout.folder / "SVHN" / "finetuned.pt"
    hostile.unlink()
    import zipfile

    with zipfile.ZipFile(hostile, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
    common = ["--method", "ties", "--suite", "vit-b32", "--suite-config", layout.config,
              "--results", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"),
              "--quiet"]
    assert harness(capsys, "validate", *common)[0] == 0
    status, _, err = harness(capsys, "run", *common)
    assert status == 2 and "SVHN/finetuned.pt" in err
    assert not marker.exists()


def test_open_clip_checkpoints_export_a_vision_model_with_projection(layout, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from harness.core.registry import METHODS

    suite = VitB32Suite(str(tmp_path / "cache"), config=layout.config)
    seen = suite.split_tasks("seen")
    result = METHODS.get("dts-d").create().merge(
        suite.load_pretrained(), {t: suite.load_finetuned(t) for t in seen})
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    for task in seen:
        folder = result.export(tmp_path / task, suite, task)
        model, info = transformers.CLIPVisionModelWithProjection.from_pretrained(
            folder, output_loading_info=True)
        assert not any(info.values()), info
        tower, projection = suite._load_backbone(result.weights_for(task), "cpu")
        head = load_file(os.path.join(folder, "zero_shot_head.safetensors"))
        assert torch.equal(head["weight"], suite.head(task))
        assert torch.equal(head["bias"], suite._biases[task])
        with torch.no_grad():
            expected = tower(pixel_values=pixels).pooler_output @ projection.T
            assert torch.equal(model.eval()(pixel_values=pixels).image_embeds, expected)
        assert transformers.CLIPImageProcessor.from_pretrained(folder).crop_size == {
            "height": SIZE, "width": SIZE}

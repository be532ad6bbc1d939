"""Check the open_clip checkpoint reader against open_clip itself (needs open_clip installed).

Builds an open_clip model (random weights: pretrained ones need the network), wraps it the way
the task_vectors code does (an ``ImageEncoder`` from a ``src.modeling`` module, text transformer
deleted, preprocess transforms kept), saves it whole with ``torch.save``, reads it back with
``tasks.openclip_layout`` (no ``src`` package, no open_clip classes), maps it onto a transformers
CLIP vision tower and prints the largest difference between the two image features.

    python scripts/check_openclip_layout.py --model ViT-B-32

Needs ``open_clip_torch`` (``pip install -c constraints.txt open_clip_torch torchvision==0.28.0``,
torchvision pinned to torch 2.13's partner). With the CPU-only torch, PyPI's torchvision wheel
cannot load its compiled operators and ``import torchvision`` fails until ``torchvision::nms``
is defined as a stub; the harness itself never needs either package.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.tasks.openclip_layout import (read_module_state, to_transformers, vision_config,
                                           visual_state)


def image_encoder_class():
    """task_vectors' ``src.modeling.ImageEncoder``, registered under that module name."""
    import open_clip

    module = types.ModuleType("src.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.model, self.train_preprocess, self.val_preprocess = \
                open_clip.create_model_and_transforms(name, pretrained=None)
            delattr(self.model, "transformer")

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    module.ImageEncoder = ImageEncoder
    sys.modules.setdefault("src", types.ModuleType("src"))
    sys.modules["src.modeling"] = module
    return ImageEncoder


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    from transformers import CLIPVisionModel

    encoder = image_encoder_class()(args.model).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "finetuned.pt")
        torch.save(encoder, path)
        del sys.modules["src.modeling"]                 # the reader must not need it
        start = time.perf_counter()
        checkpoint = read_module_state(path)
        visual = visual_state(checkpoint.state, path)
        read_s = time.perf_counter() - start
    tower_state, projection = to_transformers(visual)
    config = vision_config(visual, hidden_act=checkpoint.activation)
    tower = CLIPVisionModel(config).eval()
    getattr(tower, "vision_model", tower).load_state_dict(tower_state)
    size = config.image_size
    pixels = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    theirs = encoder.model.encode_image(pixels)
    ours = tower(pixel_values=pixels).pooler_output @ projection.T
    print(f"model {args.model}: {sum(v.numel() for v in visual.values()) / 1e6:.2f} M visual "
          f"parameters, read in {read_s:.2f} s; hidden_act {config.hidden_act}")
    print(f"max |open_clip - transformers| image feature: {(theirs - ours).abs().max():.3e} "
          f"(features up to {theirs.abs().max():.3f})")


if __name__ == "__main__":
    main()

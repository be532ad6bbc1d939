"""BitDelta, data-free (Liu et al., NeurIPS 2024, "BitDelta: Your Fine-Tune May Only Be Worth
One Bit"), as FusionBench's ``fusion_bench/method/bitdelta/bitdelta_utils/diff.py``
(``BinaryDiff``) encodes a weight before its optional calibration: each matrix's task vector
becomes its sign (one bit per entry) times one float32 scale, the mean absolute value.

The paper then calibrates the scales by distillation on data; this is the data-free variant the
issue names, the natural rival of T-Switch (2 bits) and DTS on AMR: about 1/32 of the model's
float32 bytes per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from harness.core.bits import pack_bits, unpack_bits
from harness.engine.codecs import Codec, Dense, PackedCodec, expect_tensor
from harness.engine.templates import PayloadMerge


@dataclass
class SignScale(PackedCodec):
    """``scale * (+1 where the bit is 1, -1 where it is 0)``: 1 bit per entry, one float32."""

    bits: Tensor   # packed, 1 per entry: 1 where the delta is >= 0
    scale: Tensor  # float32 scalar
    shape: tuple[int, ...]
    kind: ClassVar[str] = "sign-scale"

    def decode(self, shared=None):
        positive = unpack_bits(self.bits, 1, math.prod(self.shape)).to(torch.bool)
        return torch.where(positive, self.scale, -self.scale).reshape(self.shape)

    def tensors(self):
        return {"bits": self.bits, "scale": self.scale}

    @classmethod
    def from_stored(cls, meta, tensors):
        shape = cls.stored_shape(meta, tensors, {"bits", "scale"}, "bits", 1)
        expect_tensor(tensors["scale"], cls.kind, "scale", torch.float32, ())
        return cls(tensors["bits"], tensors["scale"], shape)


def bitdelta_encode(tau: Tensor) -> Codec:
    """A matrix or convolution kernel as its signs and mean magnitude (``BinaryDiff``: the mask
    is 1 where the delta is not negative, so a zero entry decodes to ``+scale``); 1-D and 0-d
    tensors exactly."""
    if tau.dim() < 2:
        return Dense(tau.clone())
    scale = tau.abs().mean().to(torch.float32)
    return SignScale(pack_bits(torch.ge(tau, 0).to(torch.uint8), 1), scale, tuple(tau.shape))


@dataclass(frozen=True)
class BitDelta(PayloadMerge):
    """BitDelta (data-free): each task's matrices and kernels as ``mean|tau| * sign(tau)``, 1 bit
    per entry and one float32 per tensor; serve ``theta_0 + decoded delta``. Unseen tasks get the
    pretrained model.

    - [decision: data-free variant] the scales stay the mean magnitudes; the paper's
      calibration (distilling the scales on the task's data) is not run.
    - [decision: FusionBench's code] a zero delta entry counts as positive (``mask[diff < 0] =
      0``), so it decodes to ``+scale``.
    - [decision] every tensor of two or more dimensions is binarized: the authors' code takes
      the attention and MLP projections of LLaMA-style models; here the matrices of any
      architecture, and convolution kernels too (a convolutional network has almost no
      matrices: EfficientNet-Lite0 would otherwise be stored whole). 1-D and 0-d tensors
      (biases, norms, scales) are stored exactly in float32, as the paper keeps the parameters
      it does not compress.
    """

    name = "bitdelta"
    display_name = "BitDelta"
    family = "binary"
    year = 2024

    def encoder(self, spec, plan):
        return lambda key, tau: bitdelta_encode(tau)

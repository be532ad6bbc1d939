"""Model Stock (Jang et al., ECCV 2024, "Model Stock: All we need is just a few fine-tuned
models"), as FusionBench runs it (``fusion_bench/method/model_stock/model_stock.py``): per
tensor, the average of the fine-tuned models pulled toward the pretrained anchor by a ratio set
from the angle between the task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy
import torch
from torch import Tensor

from harness.core.errors import MethodNotApplicable
from harness.engine.templates import SharedMerge

EPS = 1e-8      # the reference code's guard in the cosine and the ratio


def angle_degrees(tau_a: Tensor, tau_b: Tensor) -> float:
    """The angle between two task vectors of one tensor, in degrees, computed as the reference
    does (float32 sums, a double square root, the cosine clamped to [-1, 1])."""
    cosine = torch.sum(tau_a * tau_b) / (
        math.sqrt(torch.sum(tau_a ** 2) * torch.sum(tau_b ** 2)) + EPS)
    cosine = torch.clamp(cosine, min=-1.0, max=1.0)
    return numpy.rad2deg(torch.acos(cosine).item())


def interpolation_ratio(angle: float, k: int) -> float:
    """Model Stock's ``t = k cos(theta) / ((k - 1) cos(theta) + 1)`` (paper eq. 7, with the
    code's epsilon)."""
    theta = numpy.deg2rad(angle)
    return k * numpy.cos(theta) / ((k - 1) * numpy.cos(theta) + 1 + EPS)


def model_stock_tensor(theta0: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """One tensor of the merged model from the pretrained ``theta0`` and the fine-tuned
    ``weights`` (float32), operation for operation as the reference code."""
    k = len(weights)
    taus = [w - theta0 for w in weights]
    if k == 2:
        ratio = interpolation_ratio(angle_degrees(*taus), 2)
        average = (weights[0].clone() + weights[1].clone()) / 2.0
    else:
        angles = [angle_degrees(taus[i], taus[j]) for i in range(k) for j in range(i + 1, k)]
        total = 0
        for angle in angles:
            total += angle
        ratio = interpolation_ratio(total / len(angles), k)
        average = torch.zeros_like(weights[0])
        for weight in weights:
            average += weight
        average /= k
    return average.clone() * ratio + theta0.clone() * (1.0 - ratio)


@dataclass(frozen=True)
class ModelStock(SharedMerge):
    """Model Stock: per tensor, ``t * mean_t theta_t + (1 - t) * theta_0`` with
    ``t = k cos(theta) / ((k - 1) cos(theta) + 1)``, ``theta`` the angle between task vectors
    (averaged over every pair of the ``k`` tasks).

    - [decision: FusionBench's code] angles are averaged in degrees over pairs, and two tasks
      take the code's own path (``(w1 + w2) / 2``); the arithmetic follows it operation for
      operation.
    - [decision] a tensor whose task vectors are all zero gets the angle 90 degrees (cosine 0,
      the code's epsilon), hence ``t`` about 0: the pretrained tensor.
    - No hyperparameters; at least two task models.
    """

    name = "model-stock"
    display_name = "Model Stock"
    family = "weight averaging"
    year = 2024
    elementwise = False            # one angle per whole tensor
    merges_weights = True          # the rule gets the fine-tuned weights

    def rule(self, spec):
        if len(spec.tasks) < 2:
            raise MethodNotApplicable("model-stock needs at least 2 task models (an angle "
                                      f"between task vectors); got {len(spec.tasks)}")
        return lambda key, theta0, weights, out: model_stock_tensor(theta0, weights)

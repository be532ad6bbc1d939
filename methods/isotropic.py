"""Iso-C and Iso-CTS, isotropic merging (Marczak et al., ICML 2025, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces"), as the authors' code
(``danielm1405/iso-merging``, ``src/utils/iso.py``) and FusionBench
(``fusion_bench/method/isotropic_merging/iso_utils.py``, the same arithmetic) run them.

Every 2-D task-vector matrix is merged in a subspace whose singular values are made equal
(isotropic): Iso-C takes the subspace of the summed task vectors, Iso-CTS keeps its top
``common_space_fraction`` of directions and fills the rest with each task's own top directions
outside it. Other tensors (biases, norms, conv kernels) are averaged. The merged model is
``theta_0 + alpha * merged``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.engine.method import hp, require
from harness.engine.templates import SharedMerge

_DECISIONS = """
    Decisions, following the authors' code:

    - [decision: code] the merged 2-D matrix is computed as the authors' code does it, operation
      for operation (the task mean multiplied back by the task count, ``multi_dot(U, diag, V)``),
      so the outputs match theirs to the bit on the same BLAS.
    - [decision: FusionBench's default over the authors' selection] ``alpha = 1.0``: the authors
      choose alpha on validation data from 0.1, 0.2, ..., 3.0; sweep it with
      ``harness sweep --grid alpha=...`` to do the same.
    - Every 2-D tensor is treated as a matrix (the authors exclude only CLIP's text projection,
      which no vision suite here merges); 1-D and >2-D tensors are averaged.
    - [decision: beyond the authors' code] where LAPACK's float32 SVD fails to converge (their
      code stops with an error there), that SVD is taken in float64 and cast back.
"""


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)``, as the reference code calls it; where
    LAPACK fails to converge in float32 (an ill-conditioned matrix, on which the reference code
    stops with an error), the SVD of the float64 matrix, cast back."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def iso_c_matrix(taus: Sequence[Tensor]) -> Tensor:
    """Iso-C's merged task vector of one matrix: the summed task vectors' singular vectors
    with every singular value replaced by their mean."""
    merged = sum(taus) / len(taus)          # the authors' order of operations, for their bits
    merged *= len(taus)
    u, s, vh = svd(merged)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), vh))


def iso_cts_matrix(taus: Sequence[Tensor], common_space_fraction: float) -> Tensor:
    """Iso-CTS's merged task vector of one matrix: the top directions of the summed task
    vectors (about ``common_space_fraction`` of them, adjusted so that the rest divides evenly
    among the tasks), each task's top directions orthogonal to those, both sides
    re-orthonormalized (the polar factor of each), with equal singular values (their mean)."""
    count, size = len(taus), min(taus[0].shape)
    common = int(size * common_space_fraction)
    common = size - round((size - common) / count) * count
    u, s, vh = svd(sum(taus))
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common, :]
    per_task = int((size - common) / count)
    for i, tau in enumerate(taus):
        u_ts, s_ts, vh_ts = svd(tau - common_u @ common_u.T @ tau)
        if i == 0:
            space_u, space_s, space_vh = (torch.zeros_like(u_ts), torch.zeros_like(s_ts),
                                          torch.zeros_like(vh_ts))
        space_u[:, i * per_task:(i + 1) * per_task] = u_ts[:, :per_task]
        space_s[i * per_task:(i + 1) * per_task] = s_ts[:per_task]
        space_vh[i * per_task:(i + 1) * per_task, :] = vh_ts[:per_task, :]
    start = count * per_task
    space_u[:, start:start + common] = common_u
    space_s[start:start + common] = common_s
    space_vh[start:start + common, :] = common_vh
    left, _, right = svd(space_u)
    space_u = left @ right
    left, _, right = svd(space_vh)
    space_vh = left @ right
    space_s = torch.ones_like(space_s) * space_s.mean()
    return torch.linalg.multi_dot((space_u, torch.diag(space_s), space_vh))


def running_mean(taus: Sequence[Tensor]) -> Tensor:
    """``mean_t tau_t`` as Iso-CTS's (and TSV-M's) code accumulates it: ``m += (tau - m) / i``."""
    mean = taus[0].clone()
    for i, tau in enumerate(taus[1:], start=2):
        mean += (tau - mean) / i
    return mean


@dataclass(frozen=True)
class IsoC(SharedMerge):
    __doc__ = """Iso-C: ``theta_0 + alpha * iso(sum_t tau_t)`` per matrix, where ``iso`` keeps
    the singular vectors and sets every singular value to their mean; other tensors get the
    mean task vector.
    """ + _DECISIONS

    name = "iso-c"
    display_name = "Iso-C"
    family = "subspace"
    year = 2025
    elementwise = False              # an SVD of each whole matrix
    alpha: float = hp(1.0, "scaling coefficient of the merged task vector")

    def check(self):
        require(self.alpha >= 0, self.name, "alpha", f"must be >= 0, got {self.alpha}")

    def rule(self, spec):
        def merge_key(key, theta0, taus, out):
            if theta0.dim() == 2:
                merged = iso_c_matrix(taus)
            else:
                merged = sum(taus) / len(taus)
            return theta0 + merged * self.alpha
        return merge_key


@dataclass(frozen=True)
class IsoCts(SharedMerge):
    __doc__ = """Iso-CTS: Iso-C in a subspace made of the summed task vectors' top directions
    (``common_space_fraction`` of each matrix's rank) and each task's own top directions
    outside them; other tensors get the mean task vector.
    """ + _DECISIONS

    name = "iso-cts"
    display_name = "Iso-CTS"
    family = "subspace"
    year = 2025
    elementwise = False
    alpha: float = hp(1.0, "scaling coefficient of the merged task vector")
    common_space_fraction: float = hp(0.8, "share of each matrix's rank kept from the sum")

    def check(self):
        require(self.alpha >= 0, self.name, "alpha", f"must be >= 0, got {self.alpha}")
        require(0 <= self.common_space_fraction <= 1, self.name, "common_space_fraction",
                f"must be in [0, 1], got {self.common_space_fraction}")

    def rule(self, spec):
        def merge_key(key, theta0, taus, out):
            if theta0.dim() == 2:
                merged = iso_cts_matrix(taus, self.common_space_fraction)
            else:
                merged = running_mean(taus)
            return theta0 + merged * self.alpha
        return merge_key

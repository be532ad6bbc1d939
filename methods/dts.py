"""DTS: Decomposition, Thresholding, Scaling (arXiv 2512.01461).

Each task's delta is decomposed by a truncated SVD (2-D tensors), the singular vectors are
thresholded into four sign/magnitude groups, and each group is scaled by its RMS; a task is served
as ``base + U_hat diag(S) V_hat``. DTS-T compresses task vectors against the pretrained model,
DTS-D the difference to a TIES-merged model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from harness.accounting import dts_paper_bits, dts_rank
from harness.method import MergeMethod, hp, require
from harness.payload import (Codec, Dense, GroupCode, LowRank, pack_bits, packed_nbytes,
                             store_zeros, zero_storage_nbytes)
from harness.result import MergeResult, TaskPayload
from harness.state_dict import (ModelSpec, StateDict, encode_deltas, inspect_models, iter_keys,
                                numel, task_vector)
from methods.ties import inspect_for_ties, ties_merge

_GROUP_SCALE_BYTES = 4 * 4  # four float32 scales per grouped vector


def _upper_half(values: Tensor, member: Tensor) -> Tensor:
    """Per row, the ``floor(n/2)`` largest member ``values``; among values tied at the cut the
    first by position (the order a stable descending sort gives), found by selection, not sort."""
    out = torch.zeros_like(member)
    for row in range(values.shape[0]):
        positions = torch.nonzero(member[row]).reshape(-1)
        picked = values[row][positions]
        half = picked.numel() // 2
        if half == 0:
            continue
        cut = torch.kthvalue(picked, picked.numel() - half + 1).values
        above = picked > cut
        tied = picked == cut
        chosen = above | (tied & (torch.cumsum(tied, 0) <= half - int(above.sum())))
        out[row, positions[chosen]] = True
    return out


def group_encode(x: Tensor, grouped_dim: int | None = None) -> GroupCode:
    """Threshold and scale ``x`` (float32) into DTS's 4-group code.

    Positives split at their median into high and low halves (stable order on ties), negatives
    likewise by magnitude; each group's scale is its RMS ``||x_G|| / sqrt(|G|)``; exact zeros
    stay zero. ``grouped_dim=None`` groups over the whole tensor; an int groups each slice
    along that dimension separately (per singular vector).
    """
    shape = tuple(x.shape)
    if grouped_dim is None:
        rows = x.reshape(1, -1)
    else:
        rows = x.movedim(grouped_dim, 0).reshape(shape[grouped_dim], -1)
    pos, neg = rows > 0, rows < 0
    ids = torch.where(pos, torch.where(_upper_half(rows, pos), 0, 1),
                      torch.where(_upper_half(-rows, neg), 2, 3)).to(torch.uint8)
    scales = torch.zeros(rows.shape[0], 4, dtype=torch.float32, device=rows.device)
    nonzero = pos | neg
    for group in range(4):
        member = (ids == group) & nonzero
        count = torch.linalg.vector_norm(member.to(torch.float32), dim=1)
        norm = torch.linalg.vector_norm(rows * member, dim=1)
        scales[:, group] = torch.where(count > 0, norm / count.clamp(min=1), 0.0)
    zeros, zeros_as = store_zeros(x == 0)
    return GroupCode(pack_bits(ids, 2), scales, shape, grouped_dim, zeros, zeros_as)


def threshold_and_scale(x: Tensor) -> Tensor:
    """The decoded thresholded tensor (whole-tensor grouping): the golden-vector function."""
    return group_encode(x.to(torch.float32)).decode()


def truncated_svd(delta: Tensor, rank: int, signs: str = "canonical") -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-``rank`` SVD ``U_r, S_r, V_r`` of a float32 matrix (thin, never full U).

    ``signs="canonical"`` flips each pair so the largest-magnitude entry of ``u_i`` (the first
    on a tie) is positive (a wide matrix is decomposed through its transpose, which LAPACK
    does faster); ``"lapack"`` keeps the signs ``torch.linalg.svd(delta)`` returns.
    """
    if signs == "canonical" and delta.shape[0] < delta.shape[1]:
        # LAPACK is faster on tall matrices; the signs are normalized below anyway
        v, s, uh = torch.linalg.svd(delta.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank, :]
    if signs == "canonical":
        pivot = u.abs().argmax(dim=0)
        flip = torch.sign(u[pivot, torch.arange(rank, device=u.device)])
        flip = torch.where(flip == 0, 1.0, flip)
        u, vh = u * flip, vh * flip[:, None]
    return u.contiguous(), s.contiguous(), vh.contiguous()


def dts_encode(delta: Tensor, density: float, signs: str = "canonical",
               grouping: str = "matrix") -> Codec | None:
    """DTS's stored form of one float32 delta tensor (None when its rank rounds to 0)."""
    if delta.dim() == 0:
        return Dense(delta.clone())
    if delta.dim() != 2:
        return group_encode(delta)
    rank = dts_rank(density, delta.shape)
    if rank == 0:
        return None
    u, s, vh = truncated_svd(delta, rank, signs)
    per_vector = grouping == "vector"
    return LowRank(group_encode(u, 1 if per_vector else None), s,
                   group_encode(vh, 0 if per_vector else None))


def predicted_stored_bytes(shape: tuple[int, ...], density: float, zeros: int,
                           grouping: str = "matrix") -> int:
    """Bytes :func:`dts_encode` stores for a delta of ``shape``, from its shape alone.

    ``zeros`` is the delta's count of exact zeros (stored for tensors thresholded directly);
    singular vectors are taken to have none, so the figure is exact unless an SVD factor holds
    an exact zero, and otherwise a lower bound.
    """
    if len(shape) == 0:
        return 4
    n = numel(shape)
    if len(shape) != 2:
        return packed_nbytes(n, 2) + _GROUP_SCALE_BYTES + zero_storage_nbytes(n, zeros)
    m, k = shape
    r = dts_rank(density, shape)
    if r == 0:
        return 0
    scale_rows = 2 * r if grouping == "vector" else 2
    return (packed_nbytes(m * r, 2) + packed_nbytes(r * k, 2) + 4 * r
            + _GROUP_SCALE_BYTES * scale_rows)


def predicted_amr(spec: ModelSpec, density: float, zeros: Mapping[str, Mapping[str, int]],
                  grouping: str = "matrix") -> float:
    """The largest per-task stored-bytes AMR (percent) DTS would give at ``density``.

    ``zeros``: task -> key -> exact zeros of that task's delta (keys absent: delta is zero).
    """
    worst = 0
    for task in spec.tasks:
        total = sum(predicted_stored_bytes(spec.shapes[key], density, z, grouping)
                    for key, z in zeros[task].items())
        worst = max(worst, total)
    return 100.0 * worst / (4 * spec.merged_params)


def paper_bits(spec: ModelSpec, density: float) -> float:
    """The paper's bit count for one task over the merged parameter set."""
    return sum(dts_paper_bits(spec.shapes[key], density) for key in spec.active_keys)


def delta_zero_counts(reference: StateDict, finetuned: Mapping[str, StateDict],
                      spec: ModelSpec) -> dict[str, dict[str, int]]:
    """Per task, the exact-zero count of each non-zero delta against ``reference``.

    Only tensors thresholded directly (not 2-D) store their zeros, so 2-D keys are counted as
    0 without reading them when the reference is the pretrained model.
    """
    out: dict[str, dict[str, int]] = {t: {} for t in spec.tasks}
    for key in iter_keys(spec.active_keys, "zeros", False):
        shape = spec.shapes[key]
        for task in spec.tasks:
            changed = spec.changed[task][key]
            if reference is None:
                if changed:
                    out[task][key] = 0 if len(shape) == 2 else numel(shape) - changed
                continue
            delta = task_vector(reference[key], finetuned[task][key])
            nonzero = int(torch.count_nonzero(delta))
            if nonzero:
                out[task][key] = 0 if len(shape) == 2 else delta.numel() - nonzero
    return out


def dts_result(method: MergeMethod, spec: ModelSpec, base: StateDict,
               finetuned: Mapping[str, StateDict], density: float, signs: str, grouping: str,
               progress: bool, info: dict | None = None) -> MergeResult:
    """Encode every task's delta against ``base`` and wrap it as a personalized result."""
    records = encode_deltas(base, finetuned, spec,
                            lambda key, delta: dts_encode(delta, density, signs, grouping),
                            method.name, progress)
    bits = paper_bits(spec, density)
    return MergeResult(method.name, method.params(), base, spec.tasks, kind="personalized",
                       payloads={t: TaskPayload(r) for t, r in records.items()},
                       merged_params=spec.merged_params,
                       paper_bits={t: bits for t in spec.tasks},
                       unseen={"weighted": True}, info={"density": density, **(info or {})})


def ties_base(pretrained: StateDict, finetuned: Mapping[str, StateDict], merge_function: str,
              lam: float, k: float, progress: bool) -> tuple[ModelSpec, dict[str, Tensor]]:
    """Validate the models and build DTS-D's base theta_m: TIES over the task models, in the
    inputs' dtypes."""
    spec, thresholds = inspect_for_ties(pretrained, finetuned)
    return spec, ties_merge(pretrained, finetuned, spec, thresholds, k=k, merge=merge_function,
                            lam=lam, progress=progress, desc="dts-d base (ties)")


_DECISIONS = """
    Decisions of the spec this implementation follows:

    - [decision: code and paper eq. 4] thresholding groups the entries of the whole U_r (and
      V_r) matrix; ``grouping="vector"`` groups each singular vector separately instead.
    - [decision] ties in the median split are ordered by position (a stable sort); the
      authors' unstable argsort makes that order platform-dependent.
    - [decision: beyond the paper] ``svd_signs="canonical"`` flips each singular pair so the
      largest-magnitude entry of u_i is positive, so CPU and GPU merges agree; ``"lapack"``
      keeps torch's CPU float32 signs, which reproduces the authors' code.
    - [decision: beyond the paper] the 4-group code is stored at 2 bits per entry, plus where
      the exact zeros are (1-bit mask or int32 positions, the smaller), 4 float32 scales per
      grouped matrix and S_r in float32; AMR is reported from these stored bytes, and the
      paper's count (3 bits per element, 32 per singular value, scales free) beside it.
    - r = int(density * min(m, n)) per matrix; at r = 0 the delta is dropped. 0-d tensors are
      stored exactly; 1-D and >2-D tensors are thresholded without an SVD.
"""


@dataclass(frozen=True)
class DtsT(MergeMethod):
    __doc__ = """DTS-T: compress each task vector ``theta_t - theta_0``; serve ``theta_0 + D_hat``.
    """ + _DECISIONS

    name = "dts-t"
    kind = "personalized"
    density: float = hp(0.3, "rank as a proportion of each matrix's full rank")
    svd_signs: Literal["canonical", "lapack"] = hp("canonical", "singular-vector sign rule")
    grouping: Literal["matrix", "vector"] = hp("matrix", "threshold groups per matrix or vector")

    def check(self):
        require(0 <= self.density <= 1, self.name, "density",
                f"must be in [0, 1], got {self.density}")
        require(self.svd_signs in ("canonical", "lapack"), self.name, "svd_signs",
                "must be 'canonical' or 'lapack'")
        require(self.grouping in ("matrix", "vector"), self.name, "grouping",
                "must be 'matrix' or 'vector'")

    def merge(self, pretrained, finetuned, *, progress=False):
        spec = inspect_models(pretrained, finetuned)
        return dts_result(self, spec, pretrained, finetuned, self.density, self.svd_signs,
                          self.grouping, progress)


@dataclass(frozen=True)
class TiesBaseOptions(MergeMethod):
    """The hyperparameters of DTS-D's TIES base theta_m (mixed into DTS-D and DTS-D*)."""

    ties_merge_function: Literal["sum", "mean"] = hp("sum", "TIES merge function of theta_m")
    ties_lam: float = hp(0.3, "TIES scaling coefficient of theta_m")
    ties_k: float = hp(20.0, "TIES percent kept of theta_m")

    def check(self):
        super().check()
        require(self.ties_merge_function in ("sum", "mean"), self.name, "ties_merge_function",
                "must be 'sum' or 'mean'")
        require(0 < self.ties_k <= 100, self.name, "ties_k",
                f"must be in (0, 100], got {self.ties_k}")
        require(self.ties_lam >= 0, self.name, "ties_lam", f"must be >= 0, got {self.ties_lam}")

    def ties_base(self, pretrained, finetuned, progress):
        """(spec, theta_m) for these options."""
        return ties_base(pretrained, finetuned, self.ties_merge_function, self.ties_lam,
                         self.ties_k, progress)


@dataclass(frozen=True)
class DtsD(TiesBaseOptions, DtsT):
    __doc__ = """DTS-D: compress ``theta_t - theta_m`` against a TIES-merged ``theta_m`` (k = 20,
    lam = 0.3, the suite's merge function); serve ``theta_m + D_hat``. The delta is taken
    against theta_m as stored (in the inputs' dtype), so base plus delta reconstructs theta_t.
    """ + _DECISIONS

    name = "dts-d"

    def merge(self, pretrained, finetuned, *, progress=False):
        spec, base = self.ties_base(pretrained, finetuned, progress)
        return dts_result(self, spec, base, finetuned, self.density, self.svd_signs,
                          self.grouping, progress)

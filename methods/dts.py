"""DTS: Decomposition, Thresholding, Scaling (arXiv 2512.01461).

Each task's delta is decomposed by a truncated SVD (2-D tensors), the singular vectors are
thresholded into four sign/magnitude groups, and each group is scaled by its RMS; a task is served
as ``base + U_hat diag(S) V_hat``. DTS-T compresses task vectors against the pretrained model,
DTS-D the difference to a TIES-merged model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy
import torch
from torch import Tensor

from harness.core.accounting import amr_percent
from harness.core.bits import (pack_bits, packed_nbytes, store_zeros, unpack_bits,
                               zero_storage_nbytes)
from harness.core.spec import ModelSpec
from harness.core.svd import (SVD_SOLVERS, blocked_truncated_svd, solver_info, top_factors,
                              truncated_svd)  # noqa: F401  (re-exported: it lived here before)
from harness.core.tensors import StateDict, numel, task_vector
from harness.engine.codecs import (Codec, CodecError, Dense, LowRank, TaskPayload, expect_meta,
                                   expect_packed, expect_tensor, expect_tensors, stored_shape)
from harness.engine.method import MergeMethod, hp, require
from harness.engine.passes import BlockedDelta, encode_deltas
from harness.engine.result import MergeResult
from harness.engine.templates import PayloadMerge
from harness.io.pages import iter_keys
from harness.methods.ties import inspect_for_ties, ties_merge

_GROUP_SCALE_BYTES = 4 * 4  # four float32 scales per grouped vector


@dataclass
class GroupCode(Codec):
    """DTS's 4-group code: each entry is ``sign * scale`` of its group, at 2 bits per entry.

    Group ids: 0 positive-high, 1 positive-low, 2 negative-high, 3 negative-low. ``scales`` has
    one row of 4 per grouped vector (a single row when the whole tensor is one group set).
    Exact zeros are stored apart, as a packed 1-bit mask or int32 positions.
    """

    codes: Tensor            # packed 2-bit group ids
    scales: Tensor           # float32 (rows, 4)
    shape: tuple[int, ...]
    grouped_dim: int | None  # None: groups over the whole tensor; else one group set per slice
    zeros: Tensor | None = None
    zeros_as: str | None = None  # "mask" | "positions"
    kind: ClassVar[str] = "groups"

    def decode(self, shared=None):
        n = math.prod(self.shape)
        ids = unpack_bits(self.codes, 2, n).to(torch.int64)
        signs = torch.tensor([1.0, 1.0, -1.0, -1.0], device=self.scales.device)
        table = self.scales * signs
        rows = table.shape[0]
        if self.grouped_dim is None:
            flat = table[0][ids]
            out = flat.reshape(self.shape)
        else:
            moved = _moved_shape(self.shape, self.grouped_dim)
            flat = torch.gather(table, 1, ids.view(rows, -1))
            out = flat.reshape(moved).movedim(0, self.grouped_dim)
        out = out.contiguous().reshape(-1)
        if self.zeros is not None:
            if self.zeros_as == "mask":
                out[unpack_bits(self.zeros, 1, n).bool()] = 0.0
            else:
                out[self.zeros.to(torch.int64)] = 0.0
        return out.reshape(self.shape)

    def tensors(self):
        out = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def meta(self):
        return {"shape": list(self.shape), "grouped_dim": self.grouped_dim,
                "zeros_as": self.zeros_as}

    @classmethod
    def from_stored(cls, meta, tensors):
        kind = cls.kind
        expect_meta(meta, kind, {"shape", "grouped_dim", "zeros_as"})
        shape, dim, zeros_as = stored_shape(meta, kind), meta["grouped_dim"], meta["zeros_as"]
        if dim is not None and (type(dim) is not int or not 0 <= dim < len(shape)):
            raise CodecError(f"{kind} codec: grouped_dim {dim!r} is not a dimension of {shape}")
        if zeros_as not in (None, "mask", "positions"):
            raise CodecError(f"{kind} codec: zeros_as {zeros_as!r} is not mask or positions")
        expect_tensors(tensors, kind, {"codes", "scales"} | ({"zeros"} if zeros_as else set()))
        n = math.prod(shape)
        expect_packed(tensors["codes"], kind, "codes", n, 2)
        rows = 1 if dim is None else shape[dim]
        expect_tensor(tensors["scales"], kind, "scales", torch.float32, (rows, 4))
        zeros = tensors.get("zeros")
        if zeros_as == "mask":
            expect_packed(zeros, kind, "zeros", n, 1)
        elif zeros_as == "positions":
            expect_tensor(zeros, kind, "zeros", torch.int32)
            if zeros.dim() != 1 or (zeros.numel() and not (0 <= int(zeros.min())
                                                           and int(zeros.max()) < n)):
                raise CodecError(f"{kind} codec: zero positions outside the {n} entries")
        return cls(tensors["codes"], tensors["scales"], shape, dim, zeros, zeros_as)


def _moved_shape(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    rest = [s for i, s in enumerate(shape) if i != dim]
    return (shape[dim], *rest)


# ---- the rank rule and the paper's bit count ------------------------------------------------
def dts_rank(density: float, shape: Sequence[int]) -> int:
    """DTS's per-matrix rank: ``int(density * min(m, n))``, a floored proportion."""
    return int(density * min(shape))


def dts_paper_bits(shape: Sequence[int], density: float) -> float:
    """Bits the DTS paper's code charges for one tensor's payload.

    3 bits per U/V element and per 1-D or >2-D element, 32 bits per singular value and per 0-d
    value; group scales are not counted (official code, notes section 1.8).
    """
    if len(shape) == 0:
        return 32.0
    if len(shape) == 2:
        m, n = shape
        r = dts_rank(density, shape)
        return 3.0 * m * r + 32.0 * r + 3.0 * r * n
    numel = 1
    for s in shape:
        numel *= s
    return 3.0 * numel


def dts_paper_amr(shapes: Iterable[Sequence[int]], density: float) -> float:
    """The paper's AMR (percent) of one DTS task over a parameter set given by its shapes."""
    shapes = list(shapes)
    params = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        params += n
    bits = sum(dts_paper_bits(shape, density) for shape in shapes)
    return amr_percent(bits / 8, params)



def _cut(x: Tensor, member: Tensor, k: int, negate: bool) -> float:
    """The ``k``-th smallest of ``x``'s member entries (of their negations, ``negate``)."""
    return (_cut_numpy if x.device.type == "cpu" else _cut_torch)(x, member, k, negate)


def _cut_numpy(x: Tensor, member: Tensor, k: int, negate: bool) -> float:
    """:func:`_cut` on the CPU: numpy copies out the members only and selects in place
    (``torch.kthvalue`` makes a copy and int64 indices). ``numpy.compress`` is several times
    faster than boolean indexing but makes int64 indices, so it goes chunk by chunk."""
    values, keep = x.numpy(), member.numpy()
    parts = [slice(start, start + _CHUNK_ENTRIES) for start in range(0, values.size,
                                                                      _CHUNK_ENTRIES)]
    counts = [int(numpy.count_nonzero(keep[part])) for part in parts]
    picked = numpy.empty(sum(counts), dtype=values.dtype)
    filled = 0
    for part, n in zip(parts, counts):
        numpy.compress(keep[part], values[part], out=picked[filled:filled + n])
        filled += n
    if negate:
        numpy.negative(picked, out=picked)
    picked.partition(k - 1)
    return float(picked[k - 1])


def _cut_torch(x: Tensor, member: Tensor, k: int, negate: bool) -> float:
    """:func:`_cut` on other devices."""
    picked = x[member]
    return float(torch.kthvalue(picked.neg_() if negate else picked, k).values)


def _upper_half(rows: Tensor, member: Tensor, negate: bool) -> Tensor:
    """Per row, the ``floor(n/2)`` members of largest value (of largest magnitude, ``negate``
    for negative members); among values tied at the cut the first by position (the order a
    stable descending sort gives), found by selection, not sort."""
    out = torch.zeros_like(member)
    for row in range(rows.shape[0]):
        x, m = rows[row], member[row]
        count = int(torch.count_nonzero(m))
        half = count // 2
        if half == 0:
            continue
        cut = _cut(x, m, count - half + 1, negate)
        above = (x < -cut if negate else x > cut) & m
        need = half - int(torch.count_nonzero(above))
        if need:
            tied = torch.nonzero((x == (-cut if negate else cut)) & m).reshape(-1)
            above[tied[:need]] = True
        out[row] = above
    return out


_CHUNK_ENTRIES = 2**22   # entries per chunk of scans that would otherwise copy a whole tensor


def group_encode(x: Tensor, grouped_dim: int | None = None) -> GroupCode:
    """Threshold and scale ``x`` (float32) into DTS's 4-group code.

    Positives split at their median into high and low halves (stable order on ties), negatives
    likewise by magnitude; each group's scale is its RMS ``||x_G|| / sqrt(|G|)`` (squares
    summed in float64 chunk by chunk: no full-size temporary, and CPU and GPU agree to
    rounding); exact zeros stay zero. ``grouped_dim=None`` groups over the whole tensor; an
    int groups each slice along that dimension separately (per singular vector).
    """
    shape = tuple(x.shape)
    if grouped_dim is None:
        rows = x.reshape(1, -1)
    else:
        rows = x.movedim(grouped_dim, 0).reshape(shape[grouped_dim], -1)
    # ids 0/1: positive high/low halves, 2/3: negative high/low (3 also for zeros), computed
    # as 3 - (negative high) - 2 (positive) - (positive high); masks are viewed as 0/1 bytes
    ids = torch.full(rows.shape, 3, dtype=torch.uint8, device=rows.device)
    ids.sub_(_upper_half(rows, rows < 0, negate=True).view(torch.uint8))
    pos = rows > 0
    ids.sub_(pos.view(torch.uint8), alpha=2)
    ids.sub_(_upper_half(rows, pos, negate=False).view(torch.uint8))
    del pos
    counts = torch.zeros(rows.shape[0], 4, dtype=torch.float64, device=rows.device)
    squares = torch.zeros_like(counts)
    for start in range(0, rows.shape[1], _CHUNK_ENTRIES):
        part = slice(start, start + _CHUNK_ENTRIES)
        chunk, chunk_ids = rows[:, part], ids[:, part]
        chunk_squares = chunk.to(torch.float64).square()
        for group in range(4):
            member = chunk_ids == group
            if group == 3:                 # zeros carry id 3 but belong to no group
                member &= chunk != 0
            counts[:, group] += torch.count_nonzero(member, dim=1)
            squares[:, group] += torch.where(member, chunk_squares, 0.0).sum(dim=1)
    norms, roots = squares.sqrt().to(torch.float32), counts.sqrt().to(torch.float32)
    scales = torch.where(roots > 0, norms / roots.clamp(min=1), 0.0)
    zeros, zeros_as = store_zeros(x == 0)
    return GroupCode(pack_bits(ids, 2), scales, shape, grouped_dim, zeros, zeros_as)


def threshold_and_scale(x: Tensor) -> Tensor:
    """The decoded thresholded tensor (whole-tensor grouping): the golden-vector function."""
    return group_encode(x.to(torch.float32)).decode()


# Float32 matrices larger than this are decomposed block by block: LAPACK's thin SVD of a whole
# matrix needs several times its bytes of working memory on top of it, while the blocked SVD
# needs the Gram matrix (shorter side squared, float64) and the longer factor; on the tall
# matrices of LLMs it is faster too (docs/performance.md, "Out of core").
IN_MEMORY_SVD_BYTES = 2**28


def dts_encode(delta: Tensor | BlockedDelta, density: float, signs: str = "canonical",
               grouping: str = "matrix", solver: str = "exact") -> Codec | None:
    """DTS's stored form of one float32 delta tensor (None when its rank rounds to 0, or a
    blocked delta or, with the Gram solver, any delta is zero)."""
    if isinstance(delta, BlockedDelta):
        factors = blocked_truncated_svd(delta, dts_rank(density, delta.shape))
        if factors is None:
            return None
        u, s, vh = factors
    elif delta.dim() == 0:
        return Dense(delta.clone())
    elif delta.dim() != 2:
        return group_encode(delta)
    else:
        rank = dts_rank(density, delta.shape)
        if rank == 0:
            return None
        factors = top_factors(delta, rank, signs, solver)
        if factors is None:
            return None
        u, s, vh = factors
    per_vector = grouping == "vector"
    return LowRank(group_encode(u, 1 if per_vector else None), s,
                   group_encode(vh, 0 if per_vector else None))


def blocked_key(spec: ModelSpec, signs: str):
    """Which keys DTS decomposes block by block: matrices over ``IN_MEMORY_SVD_BYTES`` in
    float32, with canonical signs (LAPACK's own signs need LAPACK's SVD of the whole)."""
    return lambda key: (signs == "canonical" and len(spec.shapes[key]) == 2
                        and 4 * numel(spec.shapes[key]) > IN_MEMORY_SVD_BYTES)


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


def dts_facts(spec: ModelSpec, density: float, info: dict | None = None) -> dict:
    """A DTS result's accounting (the paper's bit count per task), unseen rule (eq. 8's
    similarity weights) and info."""
    bits = paper_bits(spec, density)
    return {"accounting": {"paper_bits": {t: bits for t in spec.tasks}},
            "unseen": {"weighted": True}, "info": {"density": density, **(info or {})}}


def dts_result(method: MergeMethod, spec: ModelSpec, base: StateDict,
               finetuned: Mapping[str, StateDict], density: float, signs: str, grouping: str,
               progress: bool, info: dict | None = None,
               solver: str = "exact") -> MergeResult:
    """Encode every task's delta against ``base`` at ``density`` and wrap it as a personalized
    result (the starred variants try several densities)."""
    records = encode_deltas(base, finetuned, spec,
                            lambda key, delta: dts_encode(delta, density, signs, grouping,
                                                          solver),
                            method.name, progress, blocked=blocked_key(spec, signs))
    info = {**(info or {}), **solver_info(solver)}
    return MergeResult(method.name, method.params(), base, spec.tasks, kind="personalized",
                       payloads={t: TaskPayload(r) for t, r in records.items()},
                       merged_params=spec.merged_params, **dts_facts(spec, density, info))


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
    - [decision: beyond the paper] a matrix over 256 MiB in float32 (an LLM's embedding and
      output head, a 7B or 14B model's MLP matrices) is never held whole: with canonical signs
      its SVD comes from the float64 Gram matrix of its row blocks (an exact, not randomized,
      routine; at least as accurate as float32 LAPACK for singular values within 1e9 of the
      largest), which needs far less memory than LAPACK's SVD of the whole; ``svd_signs="lapack"``
      keeps LAPACK's SVD.
    - [decision: beyond the paper] ``svd_solver`` picks how the top-r triplets are found:
      ``"exact"`` (LAPACK, the default: the published bits), ``"gram"`` (eigenvectors of the
      float64 Gram matrix of the shorter side, the route of the matrices over 256 MiB) or
      ``"randomized"`` (a seeded randomized range finder, r + 10 probes, 1 power iteration);
      both others need canonical signs. Their payloads differ from exact ones by rounding
      (gram) or by the probes' approximation (randomized); ``scripts/bench_svd_solvers.py``
      measures time and error, docs/performance.md records them.
    - group scales sum their squares in float64 (in chunks), so CPU and GPU agree to rounding.
"""


def check_svd_solver(method) -> None:
    require(method.svd_solver in SVD_SOLVERS, method.name, "svd_solver",
            f"must be one of {', '.join(map(repr, SVD_SOLVERS))}")
    require(method.svd_solver == "exact" or method.svd_signs == "canonical", method.name,
            "svd_solver", f"{method.svd_solver!r} needs svd_signs='canonical' (LAPACK's own "
            "signs come only from LAPACK's SVD)")


@dataclass(frozen=True)
class DtsT(PayloadMerge):
    __doc__ = """DTS-T: compress each task vector ``theta_t - theta_0``; serve ``theta_0 + D_hat``.
    """ + _DECISIONS

    name = "dts-t"
    display_name = "DTS-T"
    family = "low rank"
    year = 2025
    density: float = hp(0.3, "rank as a proportion of each matrix's full rank")
    svd_signs: Literal["canonical", "lapack"] = hp("canonical", "singular-vector sign rule")
    grouping: Literal["matrix", "vector"] = hp("matrix", "threshold groups per matrix or vector")
    svd_solver: Literal["exact", "gram", "randomized"] = hp(
        "exact", "how the top singular triplets are found", silent_default=True)

    def check(self):
        require(0 <= self.density <= 1, self.name, "density",
                f"must be in [0, 1], got {self.density}")
        require(self.svd_signs in ("canonical", "lapack"), self.name, "svd_signs",
                "must be 'canonical' or 'lapack'")
        require(self.grouping in ("matrix", "vector"), self.name, "grouping",
                "must be 'matrix' or 'vector'")
        check_svd_solver(self)

    def encoder(self, spec, plan):
        return lambda key, delta: dts_encode(delta, self.density, self.svd_signs, self.grouping,
                                             self.svd_solver)

    def blocked(self, spec):
        return blocked_key(spec, self.svd_signs)

    def facts(self, spec, plan):
        return dts_facts(spec, self.density, solver_info(self.svd_solver))


@dataclass(frozen=True)
class TiesBaseOptions(MergeMethod):
    """The hyperparameters of DTS-D's TIES base theta_m (mixed into DTS-D and DTS-D*): TIES's
    own, under the prefix ``ties_``, so a suite's TIES setting applies here too."""

    composes: ClassVar[dict[str, str]] = {"ties_": "ties"}
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
    display_name = "DTS-D"

    def base(self, pretrained, finetuned, progress):
        return self.ties_base(pretrained, finetuned, progress)

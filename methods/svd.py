"""The SVD baseline: each task vector stored as an exact truncated SVD in float32."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from harness.core.accounting import amr_percent
from harness.core.errors import MethodNotApplicable
from harness.core.spec import ModelSpec
from harness.core.tensors import numel
from harness.engine.codecs import Codec, Dense, LowRank
from harness.engine.method import hp, require
from harness.engine.passes import BlockedDelta
from harness.engine.templates import PayloadMerge
from harness.core.svd import SVD_SOLVERS, blocked_truncated_svd, solver_info, top_factors
from harness.methods.dts import blocked_key, delta_zero_counts, dts_rank, predicted_amr
from harness.methods.dts_star import GRID, largest_density

DTS_REFERENCE_DENSITY = 0.3


def svd_encode(tau: Tensor | BlockedDelta, density: float,
               solver: str = "exact") -> Codec | None:
    """Top-r SVD factors of a 2-D task vector (None at r = 0, or a zero blocked one); other
    tensors as they are. A blocked matrix is decomposed without holding it (the product
    ``U S V`` does not depend on the signs, so DTS's blocked routine serves here too)."""
    if isinstance(tau, BlockedDelta):
        factors = blocked_truncated_svd(tau, dts_rank(density, tau.shape))
        return None if factors is None else LowRank(Dense(factors[0]), factors[1],
                                                    Dense(factors[2]))
    if tau.dim() != 2:
        return Dense(tau.clone())
    rank = dts_rank(density, tau.shape)
    if rank == 0:
        return None
    factors = top_factors(tau, rank, "lapack" if solver == "exact" else "canonical", solver)
    if factors is None:
        return None
    u, s, vh = factors
    return LowRank(Dense(u), s, Dense(vh))


def svd_stored_bytes(shape: tuple[int, ...], density: float) -> int:
    if len(shape) != 2:
        return 4 * numel(shape)
    r = dts_rank(density, shape)
    return 4 * r * (shape[0] + 1 + shape[1])


def matched_density(spec: ModelSpec) -> float:
    """The largest density whose stored AMR (max over tasks) does not exceed DTS-T's at 0.3."""
    zeros = delta_zero_counts(None, {}, spec)
    target = predicted_amr(spec, DTS_REFERENCE_DENSITY, zeros)

    def amr_at(density):
        worst = max(sum(svd_stored_bytes(spec.shapes[k], density) for k in zeros[t])
                    for t in spec.tasks)
        return amr_percent(worst, spec.merged_params)
    # "does not exceed" the target: search strictly below a hair above it
    step = largest_density(amr_at, target * (1 + 1e-12))
    if step < 0:
        raise MethodNotApplicable(
            f"svd: no density matches DTS-T's AMR at density 0.3 ({target:.4f}%): the tensors "
            f"stored as they are already take {amr_at(0.0):.4f}%")
    density = step / GRID
    if all(dts_rank(density, spec.shapes[k]) == 0 for k in spec.active_keys
           if len(spec.shapes[k]) == 2):
        warnings.warn(
            f"svd: at DTS-T's AMR ({target:.3f}%) the tensors stored as they are (1-D and >2-D, "
            f"float32) take {amr_at(0.0):.3f}%, leaving rank 0 for every matrix: this baseline "
            "keeps no low-rank information; pass density to compare at another budget",
            stacklevel=5)
    return density


@dataclass(frozen=True)
class SvdBaseline(PayloadMerge):
    """Truncated SVD of each 2-D task vector, ``r = int(density * min(m, n))``, U, S, V in
    float32; 1-D and other tensors stored as they are. With no density given, the largest
    density (0.001 grid) whose stored-bytes AMR does not exceed DTS-T's at r = 0.3, as the
    paper matches them. Unseen tasks get the pretrained model (paper, appendix B.2).

    [decision] DTS-T's reference AMR is predicted from shapes and the task vectors' zero
    counts, taking its SVD factors to hold no exact zeros (a lower bound on its bytes), so
    the baseline never stores more than DTS-T. Matrices over 256 MiB in float32 are decomposed
    block by block as DTS does (``methods.dts.blocked_truncated_svd``).
    """

    name = "svd"
    display_name = "SVD"
    family = "low rank"
    year = 2024
    density: float | None = hp(None, "rank proportion; None matches DTS-T's AMR at 0.3")
    svd_solver: Literal["exact", "gram", "randomized"] = hp(
        "exact", "how the top singular triplets are found", silent_default=True)

    def check(self):
        if self.density is not None:
            require(0 <= self.density <= 1, self.name, "density",
                    f"must be in [0, 1], got {self.density}")
        require(self.svd_solver in SVD_SOLVERS, self.name, "svd_solver",
                f"must be one of {', '.join(map(repr, SVD_SOLVERS))}")

    def plan(self, spec):
        """The density: the one given, or DTS-T's matched one."""
        return self.density if self.density is not None else matched_density(spec)

    def encoder(self, spec, density):
        return lambda key, tau: svd_encode(tau, density, self.svd_solver)

    def blocked(self, spec):
        return blocked_key(spec, "canonical")

    def facts(self, spec, density):
        return {"info": {"density": density, **solver_info(self.svd_solver)}}

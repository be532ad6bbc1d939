"""DTS-T* and DTS-D*: DTS with the largest density whose AMR stays under a budget (1%)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from harness.core.accounting import amr_percent
from harness.core.errors import MethodNotApplicable
from harness.engine.method import MergeMethod, hp, require
from harness.engine.passes import inspect_models
from harness.methods.dts import (_DECISIONS, TiesBaseOptions, check_svd_solver,
                                 delta_zero_counts, dts_result, paper_bits, predicted_amr)

GRID = 1000  # densities are searched on a 0.001 grid


def largest_density(amr_at, budget: float) -> int:
    """The largest grid step ``i`` (density ``i / GRID``) with ``amr_at(i / GRID) < budget``,
    by bisection (AMR does not decrease with density); -1 when even density 0 exceeds it."""
    if amr_at(0.0) >= budget:
        return -1
    lo, hi = 0, GRID + 1            # amr_at(lo) < budget; hi is beyond the grid or over budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if amr_at(mid / GRID) < budget:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class DtsTStar(MergeMethod):
    __doc__ = """DTS-T*: DTS-T at the largest density on a 0.001 grid whose AMR, maximum over
    tasks, is below ``budget`` percent. ``budget_count="stored"`` counts the bytes actually
    stored (the prediction from shapes is checked after encoding and the density lowered if an
    exact zero in an SVD factor made it too low); ``"paper"`` uses the paper's bit count, to
    reproduce its choice of r.
    """ + _DECISIONS

    name = "dts-t-star"
    display_name = "DTS-T*"
    kind = "personalized"
    family = "low rank"
    year = 2025
    budget: float = hp(1.0, "AMR budget in percent (strictly below)")
    budget_count: Literal["stored", "paper"] = hp("stored", "which AMR the budget applies to")
    svd_signs: Literal["canonical", "lapack"] = hp("canonical", "singular-vector sign rule")
    grouping: Literal["matrix", "vector"] = hp("matrix", "threshold groups per matrix or vector")
    svd_solver: Literal["exact", "gram", "randomized"] = hp(
        "exact", "how the top singular triplets are found", silent_default=True)

    def check(self):
        require(self.budget > 0, self.name, "budget", f"must be > 0, got {self.budget}")
        require(self.budget_count in ("stored", "paper"), self.name, "budget_count",
                "must be 'stored' or 'paper'")
        check_svd_solver(self)

    def _base(self, pretrained, finetuned, progress):
        """(spec, base, reference for delta zero counts: None means the pretrained model)."""
        return inspect_models(pretrained, finetuned), pretrained, None

    def merge(self, pretrained, finetuned, *, progress=False):
        spec, base, reference = self._base(pretrained, finetuned, progress)
        if self.budget_count == "paper":
            def amr_at(density):
                return amr_percent(paper_bits(spec, density) / 8, spec.merged_params)
        else:
            zeros = delta_zero_counts(reference, finetuned, spec)

            def amr_at(density):
                return predicted_amr(spec, density, zeros, self.grouping)
        step = largest_density(amr_at, self.budget)
        if step < 0:
            raise MethodNotApplicable(
                f"{self.name}: no density keeps AMR below {self.budget}%: the smallest "
                f"reachable ({self.budget_count} count, density 0) is {amr_at(0.0):.4f}%")
        while True:
            result = dts_result(self, spec, base, finetuned, step / GRID, self.svd_signs,
                                self.grouping, progress, {"budget": self.budget},
                                self.svd_solver)
            if self.budget_count == "paper" or max(result.amr().values()) < self.budget or step == 0:
                return result
            step -= 1


@dataclass(frozen=True)
class DtsDStar(TiesBaseOptions, DtsTStar):
    __doc__ = """DTS-D*: DTS-D (TIES base theta_m) at the largest density on a 0.001 grid whose
    AMR, maximum over tasks, is below ``budget`` percent; see DTS-T* for the counting.
    """ + _DECISIONS

    name = "dts-d-star"
    display_name = "DTS-D*"

    def _base(self, pretrained, finetuned, progress):
        spec, base = self.ties_base(pretrained, finetuned, progress)
        return spec, base, base

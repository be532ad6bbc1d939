"""ADR and AMR, as the spec's Accounting section defines them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def adr(individual: float, merged: float) -> float:
    """Accuracy drop rate in percent: ``100 * (A_ind - A_m) / A_ind``."""
    if individual == 0:
        raise ValueError("ADR is undefined when the individual models' mean metric is 0")
    return 100.0 * (individual - merged) / individual


def amr_percent(stored_bytes: float, merged_params: int) -> float:
    """Additional memory rate in percent: payload bytes over the float32 bytes of the model."""
    if merged_params <= 0:
        raise ValueError("AMR needs a positive number of merged parameters")
    return 100.0 * stored_bytes / (4 * merged_params)


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

"""ADR and AMR, as the spec's Accounting section defines them."""

from __future__ import annotations

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

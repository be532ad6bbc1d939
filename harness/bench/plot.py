"""The accuracy-memory trade-off of a leaderboard split, as SVG: average accuracy against AMR.

One point per row (its 95% interval on the average as an error bar where the record has one),
the individual models' average as a dashed line, and the Pareto front (no other row is both
more accurate and smaller) drawn as steps: the picture of the paper's trade-off. matplotlib is
an optional extra (``pip install merge-harness[plots]``), imported only here. The SVG is
deterministic (fixed id salt, no date, text kept as text), so ``harness leaderboard --check``
can compare it byte for byte.
"""

from __future__ import annotations

import io
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    label: str
    amr: float              # percent
    average: float          # percent
    low: float | None = None
    high: float | None = None


def available() -> bool:
    """Whether matplotlib can be imported (plots are skipped without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pareto_front(points: list[Point]) -> list[Point]:
    """The rows no other row dominates (at most the AMR and at least the average, one of them
    strictly), by increasing AMR."""
    front = []
    for p in sorted(points, key=lambda p: (p.amr, -p.average)):
        if not front or p.average > front[-1].average:
            front.append(p)
    return front


def tradeoff_svg(points: list[Point], title: str, individual: float | None = None) -> str:
    """The SVG text of the trade-off plot of ``points``."""
    import matplotlib
    from matplotlib.figure import Figure

    style = {"svg.hashsalt": "merge-harness", "svg.fonttype": "none", "font.size": 9,
             "font.family": "sans-serif"}
    with matplotlib.rc_context(style):
        figure = Figure(figsize=(8.4, 4.2))
        axes = figure.add_axes((0.08, 0.12, 0.62, 0.78))
        key = []
        for number, p in enumerate(points, start=1):
            error = None
            if p.low is not None and p.high is not None:
                error = [[p.average - p.low], [p.high - p.average]]
            axes.errorbar([p.amr], [p.average], yerr=error, fmt="o", markersize=4,
                          capsize=2, color="tab:blue", ecolor="tab:gray", linewidth=0.8)
            # a number beside each point and its row in a key: labels of close rows would
            # overlap
            axes.annotate(str(number), (p.amr, p.average), textcoords="offset points",
                          xytext=(3 + 7 * (number % 3), 2 - 4 * (number % 2)), fontsize=7)
            key.append(f"{number:>2}  {p.label}")
        figure.text(0.73, 0.90, "\n".join(key), fontsize=7, va="top", family="monospace")
        front = pareto_front(points)
        if len(front) > 1:
            axes.step([p.amr for p in front], [p.average for p in front], where="post",
                      color="tab:orange", linewidth=1, label="Pareto front")
        if individual is not None:
            axes.axhline(individual, color="tab:green", linestyle="--", linewidth=0.8,
                         label="individual models")
        axes.set_xlabel("AMR: extra memory per task (% of the model)")
        axes.set_ylabel("average accuracy (%)")
        axes.set_title(title)
        axes.grid(True, linewidth=0.3)
        if len(front) > 1 or individual is not None:
            axes.legend(loc="lower right", fontsize=7)
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    return out.getvalue()

"""One figure of every headline number per template and per order (ABBA / BABA), with 95% CIs.

Reads ``summary["breakdown"]`` (:mod:`ioi.breakdown`) of the figure's experiment and of its
``extra_experiments`` (see :data:`ioi.registry.FIGURES`). One panel per scalar quantity: each
template's value with its CI, then ABBA and BABA, and the overall value as a dashed line. Sweeps
(path-patching top heads) are tables, not panels: ``paper_comparison.md``'s secondary table lists
each template's top heads.
"""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np

from ioi.breakdown import numeric_breakdowns
from ioi.plots.common import model_suptitle, num

MAX_PANELS = 24
N_COLUMNS = 4


def _point(entry: Mapping) -> tuple[float, float, float]:
    value = entry.get("value")
    ci = entry.get("ci") or [None, None]
    v = np.nan if value is None else float(value)
    lo = v if ci[0] is None else float(ci[0])
    hi = v if ci[1] is None else float(ci[1])
    return v, max(v - lo, 0.0) if np.isfinite(v) else 0.0, max(hi - v, 0.0) if np.isfinite(v) else 0.0


def _panel(ax, title: str, bd: Mapping) -> None:
    groups = list(bd.get("by_template", {}).items()) + list(bd.get("by_order", {}).items())
    values, lows, highs = zip(*(_point(e) for _, e in groups)) if groups else ((), (), ())
    n_templates = len(bd.get("by_template", {}))
    x = np.arange(len(groups)) + np.array([0] * n_templates + [1] * (len(groups) - n_templates))
    colours = ["#1b9e77" if str(g).startswith("ABBA") else "#7570b3" for g, _ in groups]
    ax.errorbar(x, values, yerr=[lows, highs], fmt="none", ecolor="#999999", lw=0.8, capsize=2)
    ax.scatter(x, values, c=colours, s=14, zorder=3)
    overall = bd.get("overall", {}).get("value")
    if overall is not None:
        ax.axhline(overall, color="black", ls="--", lw=0.7)
    ax.set_xticks(x, [str(g) for g, _ in groups], rotation=90, fontsize=5.5)
    spread = bd.get("spread") or {}
    note = ""
    if spread.get("min") is not None:
        note = f"\ntemplates {num(spread['min'])} – {num(spread['max'])}"
    ax.set_title(title + note, fontsize=7.5)
    ax.tick_params(axis="y", labelsize=6.5)


def breakdowns(frame, summary, meta, extra: Mapping[str, Mapping] | None = None):
    """Per-template / per-order panels of every scalar breakdown of this and the extra summaries."""
    sources = {meta.get("experiment", "this"): summary, **dict(extra or {})}
    panels = [(f"{experiment}: {quantity}", bd) for experiment, s in sources.items()
              for quantity, bd in numeric_breakdowns(s)][:MAX_PANELS]
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No breakdowns in these results.", ha="center", va="center")
        return fig
    rows = math.ceil(len(panels) / N_COLUMNS)
    fig, axes = plt.subplots(rows, N_COLUMNS, figsize=(4.0 * N_COLUMNS, 2.9 * rows), squeeze=False)
    for ax, (title, bd) in zip(axes.flat, panels):
        _panel(ax, title, bd)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    model_suptitle(fig, "Headline numbers per template and per order (green ABBA, purple BABA; "
                             "95% CIs; dashed: all prompts)", meta)
    fig.tight_layout()
    return fig

"""Shared plotting pieces: head-class colours, layer x head heatmaps with outlined heads, a text
panel with what the paper reports, titles that name the model, atomic PNG + PDF saving.

Colour scales follow the paper's plots (plotly "RdBu" centred at 0: negative red, positive blue).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ioi.circuits import CLASS_ORDER, Circuit  # noqa: E402
from ioi.provenance import atomic_path  # noqa: E402

Head = tuple[int, int]

CLASS_COLOURS: dict[str, str] = {
    "name mover": "#1b9e77",
    "backup name mover": "#66c2a5",
    "negative name mover": "#d95f02",
    "s-inhibition": "#7570b3",
    "induction": "#e7298a",
    "duplicate token": "#e6ab02",
    "previous token": "#a6761d",
    "other": "#666666",
}

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "savefig.dpi": 160,
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
)


def model_title(title: str, meta: Mapping) -> str:
    """``title`` followed by the model it came from (never GPT-2 unless it was GPT-2)."""
    model = meta.get("model", {})
    spec = model.get("spec", "unknown model")
    label = {"planted-ioi": "planted-circuit model (not GPT-2)"}.get(spec, spec)
    if str(spec).startswith("random-"):
        label = f"{spec} (random weights, not GPT-2)"
    n = meta.get("N")
    return f"{title}\n{label}" + (f", N={n}" if n else "")


def head_heatmap(
    ax,
    values: np.ndarray,
    *,
    cbar_label: str,
    outlined: Mapping[Head, str] | None = None,
    symmetric: bool = True,
    cmap: str = "RdBu",
    annotate_top: int = 0,
) -> None:
    """Layer x head heatmap; heads in ``outlined`` get a box in their class colour."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    bound = bound or 1.0
    kwargs = dict(vmin=-bound, vmax=bound) if symmetric else {}
    image = ax.imshow(values, cmap=cmap, aspect="auto", **kwargs)
    colorbar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    colorbar.set_label(cbar_label)
    n_layers, n_heads = values.shape
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_facecolor("#dddddd")  # NaN cells (sender cannot reach the receiver)
    for (layer, head), cls in (outlined or {}).items():
        if layer < n_layers and head < n_heads:
            ax.add_patch(
                Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=2.0,
                          edgecolor=CLASS_COLOURS.get(cls, "black"))
            )
    if annotate_top and finite.size:
        order = np.argsort(-np.abs(np.nan_to_num(values)).ravel())[:annotate_top]
        for flat in order:
            layer, head = divmod(int(flat), n_heads)
            ax.text(head, layer, f"{layer}.{head}", ha="center", va="center", fontsize=6)


def class_legend(ax, classes: Sequence[str], title: str) -> None:
    handles = [
        Rectangle((0, 0), 1, 1, fill=False, lw=2, edgecolor=CLASS_COLOURS.get(c, "black"), label=c)
        for c in classes
    ]
    if handles:
        ax.legend(handles=handles, title=title, loc="upper left", bbox_to_anchor=(1.25, 1.0),
                  fontsize=7, title_fontsize=7, frameon=False)


def circuit_outlines(circuit: Circuit, classes: Sequence[str] | None = None) -> dict[Head, str]:
    """Heads of ``circuit`` (optionally only some classes) -> their class, for outlining."""
    wanted = classes or CLASS_ORDER
    return {tuple(h): cls for cls in wanted if cls in circuit.classes for h in circuit.classes[cls]}


def paper_panel(ax, text: str, *, heading: str = "What the paper reports (GPT-2 small)") -> None:
    """A text panel quoting the paper's stated result for this figure."""
    ax.axis("off")
    wrapped = "\n".join(textwrap.fill(par, 46) for par in text.split("\n"))
    ax.text(0.0, 1.0, heading, fontweight="bold", va="top", ha="left", transform=ax.transAxes)
    ax.text(0.0, 0.92, wrapped, va="top", ha="left", transform=ax.transAxes, fontsize=8)


def outline_label(meta: Mapping) -> str:
    spec = meta.get("model", {}).get("spec", "")
    return "planted heads (ground truth)" if spec == "planted-ioi" else "heads named by the paper"


def save_figure(fig, png_path: str | Path, pdf_path: str | Path | None = None) -> None:
    """Save PNG (and PDF) atomically, then close the figure."""
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    if pdf_path is not None:
        with atomic_path(pdf_path) as tmp:
            fig.savefig(tmp, format="pdf", bbox_inches="tight")
    plt.close(fig)


def grid_from_frame(frame, value: str, n_layers: int, n_heads: int, **filters) -> np.ndarray:
    """A [layer, head] array from a tidy frame with columns layer, head, ``value``."""
    rows = frame
    for column, wanted in filters.items():
        rows = rows[rows[column] == wanted]
    grid = np.full((n_layers, n_heads), np.nan)
    grid[rows["layer"].to_numpy(int), rows["head"].to_numpy(int)] = rows[value].to_numpy(float)
    return grid

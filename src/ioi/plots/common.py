"""Shared plotting pieces: head-class colours, layer x head heatmaps with outlined heads, a text
panel with what the paper reports, titles that name the model, numbers in fixed format, atomic
PNG + PDF saving.

Rules every figure follows (tests/test_figures.py checks them on every registered figure): no two
text elements overlap (:func:`model_suptitle` sits above the tallest axes title), numbers are
written with :func:`num` (fixed notation, never ``1.4e+02``) or, for a numerical error,
:func:`sci` (``1.2×10⁻⁷``), every layer x head heatmap outlines the circuit's heads
(:func:`outline_heads`), and titles name the model, never a machine path (:func:`model_label`).

Colour scales follow the paper's plots (plotly "RdBu" centred at 0: negative red, positive blue).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from ioi.circuits import CLASS_ORDER, Circuit  # noqa: E402
from ioi.labels import model_label  # noqa: E402  (also imported from here by the figures)
from ioi.provenance import atomic_path  # noqa: E402

Head = tuple[int, int]
OUTLINE_GID = "circuit-head-outline"  # gid of the outline patches (tests find them by it)

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
        # An axis offset reads x10^-7, not 1e-7.
        "axes.formatter.use_mathtext": True,
    }
)


def model_title(title: str, meta: Mapping) -> str:
    """``title`` followed by the model it came from (never GPT-2 unless it was GPT-2)."""
    n = meta.get("N")
    return f"{title}\n{model_label(meta)}" + (f", N={n}" if n else "")


class _SuptitleAboveAxes(Text):
    """A suptitle that, each time it is drawn, moves just above the highest axes element (titles
    of any number of lines, legends placed above axes), so it never overlaps them. A figure with
    constrained layout keeps the engine's placement (decided once: ``savefig(bbox_inches="tight")``
    swaps the engine for a placeholder before its final draw)."""

    reposition = True

    def draw(self, renderer):
        fig = self.figure
        if self.reposition and fig is not None:
            tops = [ax.get_tightbbox(renderer).y1 for ax in fig.axes if ax.get_visible()]
            if tops:
                pad = 6 * fig.dpi / 72
                y = fig.transFigure.inverted().transform((0, max(tops) + pad))[1]
                self.set_y(max(y, 0.98))
                self.set_verticalalignment("bottom")
        super().draw(renderer)


def model_suptitle(fig, title: str, meta: Mapping, **kwargs):
    """The figure's title naming the model (:func:`model_title`), kept above every axes."""
    text = fig.suptitle(model_title(title, meta), **kwargs)
    text.__class__ = _SuptitleAboveAxes
    engine = fig.get_layout_engine()
    text.reposition = not (engine is not None and "Constrained" in type(engine).__name__)
    return text


def num(value, sig: int = 3, *, signed: bool = False, max_decimals: int = 4) -> str:
    """``value`` in fixed notation with about ``sig`` significant digits, never e-notation:
    140, 3.56, 0.0696; a value that rounds to zero at ``max_decimals`` decimals prints ``0``."""
    if value is None:
        return "n/a"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = min(max(sig - 1 - magnitude, 0), max_decimals)
    if round(value, decimals) == 0:
        return "0"
    return f"{value:{'+' if signed else ''}.{decimals}f}"


def ci_error_bars(values: Sequence, cis: Sequence) -> np.ndarray:
    """``yerr`` for ``bar`` / ``errorbar``: ``[2, n]``, each value's distance down to its CI's low end
    and up to its high end. A missing value, CI or CI end (None or NaN) draws no bar there (0)."""
    def column(items):
        return np.asarray([np.nan if v is None else float(v) for v in items], dtype=float)

    centre = column(values)
    low = column(None if c is None else c[0] for c in cis)
    high = column(None if c is None else c[1] for c in cis)
    return np.nan_to_num(np.abs(np.stack([centre - low, high - centre])))


_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def sci(value, digits: int = 2) -> str:
    """A numerical error or tolerance: ``0``, fixed notation from 1e-4 up, else ``1.2×10⁻⁷``."""
    if value is None:
        return "n/a"
    value = float(value)
    if value == 0 or not math.isfinite(value) or 1e-4 <= abs(value) < 1e5:
        return num(value, digits)
    exponent = math.floor(math.log10(abs(value)))
    mantissa = value / 10**exponent
    return f"{mantissa:.{max(digits - 1, 0)}f}×10{str(exponent).translate(_SUPERSCRIPT)}"


def _display_exponent(bound: float) -> int:
    """The power of ten to factor out of a colour scale reaching ``bound`` (0 when fixed ticks read
    well): otherwise matplotlib writes it as an offset text above the colorbar, into the title."""
    if not bound or not math.isfinite(bound) or 1e-3 <= abs(bound) < 1e5:
        return 0
    return math.floor(math.log10(abs(bound)))


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
    exponent = _display_exponent(bound)
    if exponent:  # tiny (numerical-noise) or huge values: the power of ten goes into the label
        colorbar.formatter = FuncFormatter(lambda v, _pos: num(v / 10**exponent, 2))
        colorbar.update_ticks()
        cbar_label += f" (×10{str(exponent).translate(_SUPERSCRIPT)})"
    colorbar.set_label(cbar_label)
    n_layers, n_heads = values.shape
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_facecolor("#dddddd")  # NaN cells (sender cannot reach the receiver)
    outline_heads(ax, outlined or {}, n_layers, n_heads)
    if annotate_top and finite.size:
        order = np.argsort(-np.abs(np.nan_to_num(values)).ravel())[:annotate_top]
        for flat in order:
            layer, head = divmod(int(flat), n_heads)
            ax.text(head, layer, f"{layer}.{head}", ha="center", va="center", fontsize=6)


def outline_heads(ax, outlined: Mapping[Head, str], n_layers: int, n_heads: int, *,
                  lw: float = 2.0) -> None:
    """Box each head of ``outlined`` (``(layer, head) -> class``: the paper's named heads for
    GPT-2, the planted heads for the planted model) on a layer x head image in its class colour.
    Every layer x head heatmap calls this (directly or through :func:`head_heatmap`)."""
    for (layer, head), cls in outlined.items():
        if layer < n_layers and head < n_heads:
            ax.add_patch(
                Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=lw,
                          edgecolor=CLASS_COLOURS.get(cls, "black"), gid=OUTLINE_GID)
            )


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

"""Checks a reader would make of a rendered matplotlib figure, applied to every registered figure
(tests/test_figures.py): no two text elements overlap, no table cell's text runs over its cell,
no number is printed in e-notation, every layer x head heatmap outlines the circuit's heads.

Text elements are recorded as matplotlib draws them (``Text.draw`` is wrapped while the figure
is saved as the workflow saves it, PNG with ``bbox_inches="tight"``), so titles, suptitles, axis labels, the tick labels actually shown, offset
texts, legend entries, annotations and table cells are all seen, with their window extents from
the renderer that drew them.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import re
from typing import Mapping

import numpy as np
from matplotlib.figure import Figure
from matplotlib.table import Cell
from matplotlib.text import Text

# Two boxes overlap when they share more than this many points in both directions (the boxes of
# two lines of one stacked label touch; a real collision shares several points).
OVERLAP_TOLERANCE_PT = 1.0

# A number in the computer's e-notation: 1.4e+02, 8.4e-12, 3E5 (also with the Unicode minus that
# matplotlib writes). Fixed format reads better for any magnitude a figure shows; a true numerical
# error is written 1.2×10⁻⁷ (ioi.plots.common.sci).
E_NOTATION = re.compile(r"(?<![0-9A-Za-z_.])[-+−]?\d+(?:\.\d*)?[eE][-+−]?\d+(?![0-9A-Za-z_])")
# The ×10ⁿ form where fixed format is as short: 10⁻³ .. 10⁴ (a colour scale factors out 10⁻⁴ and
# below: ioi.plots.common._display_exponent).
SHORT_POWER = re.compile(r"×\s?10(?:⁻[¹²³]|[⁰¹²³⁴])(?![⁰¹²³⁴⁵⁶⁷⁸⁹])")


@dataclasses.dataclass
class DrawnText:
    artist: Text
    text: str
    box: np.ndarray  # [[x0, y0], [x1, y1]] in the saved image's pixels
    image_size: tuple[float, float]  # (width, height) of the saved image in pixels
    cell_box: np.ndarray | None = None  # the table cell holding this text, if any

    def describe(self) -> str:
        parent = type(self.artist).__name__
        return f"{parent} {self.text!r}"


def drawn_texts(fig: Figure) -> list[DrawnText]:
    """Every non-empty, visible text element matplotlib draws when it saves ``fig`` as the
    workflow does (PNG, ``bbox_inches="tight"``), with its extent in the saved image."""
    passes: list[list[DrawnText]] = []
    sizes: list[tuple[float, float]] = []
    original_text_draw, original_figure_draw, original_cell_draw = Text.draw, Figure.draw, Cell.draw

    def recording_figure_draw(self, renderer):
        passes.append([])
        sizes.append((float(renderer.width), float(renderer.height)))
        return original_figure_draw(self, renderer)

    def recording_text_draw(self, renderer):
        original_text_draw(self, renderer)
        text = self.get_text()
        if passes and self.get_visible() and text.strip() and self.get_alpha() != 0:
            box = self.get_window_extent(renderer)
            passes[-1].append(DrawnText(self, text, np.array(box.get_points()), sizes[-1]))

    def recording_cell_draw(self, renderer):
        original_cell_draw(self, renderer)
        for item in reversed(passes[-1] if passes else []):
            if item.artist is self.get_text():
                item.cell_box = np.array(self.get_window_extent(renderer).get_points())
                break

    Text.draw, Figure.draw, Cell.draw = recording_text_draw, recording_figure_draw, recording_cell_draw
    try:
        fig.savefig(io.BytesIO(), format="png", bbox_inches="tight")
    finally:
        Text.draw, Figure.draw, Cell.draw = original_text_draw, original_figure_draw, original_cell_draw
    return passes[-1] if passes else []


def texts_outside_figure(fig: Figure, texts: list[DrawnText]) -> list[str]:
    """Text elements cut off by the saved image's edge (from :func:`drawn_texts`)."""
    tolerance = OVERLAP_TOLERANCE_PT * fig.dpi / 72
    problems = []
    for item in texts:
        width, height = item.image_size
        (x0, y0), (x1, y1) = item.box
        if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
            problems.append(f"{item.describe()} is cut off by the figure's edge")
    return problems


def _intersection(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    width = min(a[1, 0], b[1, 0]) - max(a[0, 0], b[0, 0])
    height = min(a[1, 1], b[1, 1]) - max(a[0, 1], b[0, 1])
    return width, height


def overlapping_texts(fig: Figure, texts: list[DrawnText] | None = None) -> list[str]:
    """Pairs of drawn text elements whose boxes overlap by more than the tolerance."""
    texts = drawn_texts(fig) if texts is None else texts
    tolerance = OVERLAP_TOLERANCE_PT * fig.dpi / 72
    problems = []
    for a, b in itertools.combinations(texts, 2):
        width, height = _intersection(a.box, b.box)
        if width > tolerance and height > tolerance:
            problems.append(f"{a.describe()} overlaps {b.describe()} ({width:.0f} x {height:.0f} px)")
    return problems


def overflowing_table_cells(fig: Figure, texts: list[DrawnText]) -> list[str]:
    """Table cells whose text is wider or taller than the cell (it runs into its neighbours)."""
    tolerance = OVERLAP_TOLERANCE_PT * fig.dpi / 72
    problems = []
    for item in texts:
        if item.cell_box is None:
            continue
        outer, inner = item.cell_box, item.box
        over = max(outer[0, 0] - inner[0, 0], inner[1, 0] - outer[1, 0],
                   outer[0, 1] - inner[0, 1], inner[1, 1] - outer[1, 1])
        if over > tolerance:
            problems.append(f"table cell text {item.text!r} runs {over:.0f} px over its cell")
    return problems


def exponent_numbers(texts: list[DrawnText]) -> list[str]:
    """Drawn texts holding a number in e-notation (or ×10ⁿ where fixed format is as short)."""
    problems = []
    for item in texts:
        for match in E_NOTATION.finditer(item.text):
            problems.append(f"{item.describe()}: {match.group(0)!r} in e-notation")
        for match in SHORT_POWER.finditer(item.text):
            problems.append(f"{item.describe()}: {match.group(0)!r} where fixed format reads better")
    return problems


def unoutlined_head_heatmaps(fig: Figure, summary: Mapping, outline_gid: str) -> list[str]:
    """Layer x head images (shape [n_layers, n_heads]) whose axes carry no outline of the
    circuit's heads drawn by ioi.plots.common.outline_heads (patches with gid ``outline_gid``),
    or outline a head that is not in the circuit."""
    n_layers, n_heads = summary.get("n_layers"), summary.get("n_heads")
    classes = summary.get("circuit", {}).get("classes", {})
    circuit_heads = {tuple(int(v) for v in key.split(".")) for heads in classes.values() for key in heads}
    if not (n_layers and n_heads and circuit_heads):
        return []
    problems = []
    for ax in fig.axes:
        for image in ax.get_images():
            if np.shape(image.get_array())[:2] != (n_layers, n_heads):
                continue
            marks = [p for p in ax.patches if p.get_gid() == outline_gid]
            outlined = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in marks}
            title = ax.get_title() or "untitled axes"
            if not marks:
                problems.append(f"head heatmap {title!r} outlines no circuit head")
            elif not outlined <= circuit_heads:
                problems.append(f"head heatmap {title!r} outlines non-circuit heads "
                                f"{sorted(outlined - circuit_heads)}")
    return problems


_REMOTE = re.compile(r"^\s*(?:https?:)?//", re.I)
_REMOTE_IMPORT = re.compile(r"""\bimport\s*(?:\(\s*|[^;'"]*?\bfrom\s*)["'](?:https?:)?//""", re.I)


def external_references(page: str) -> list[str]:
    """What an HTML page would fetch from the network: ``src`` / ``href`` (stylesheets, scripts,
    images, frames) or ``srcset`` / ``data`` pointing off the file, and ES module imports of
    remote URLs inside inline scripts. Links a reader may click (``<a href>``) are allowed."""
    from html.parser import HTMLParser

    found: list[str] = []

    class Parser(HTMLParser):
        in_script = False

        def handle_starttag(self, tag, attrs):
            for name, value in attrs:
                if value is None or (tag == "a" and name == "href"):
                    continue
                if name in ("src", "href", "srcset", "data", "poster") and _REMOTE.search(value):
                    found.append(f"<{tag} {name}={value!r}>")
            self.in_script = tag == "script"

        def handle_endtag(self, tag):
            if tag == "script":
                self.in_script = False

        def handle_data(self, data):
            if self.in_script:
                found.extend(f"script imports {m.group(0)!r}" for m in _REMOTE_IMPORT.finditer(data))

    Parser().feed(page)
    return found

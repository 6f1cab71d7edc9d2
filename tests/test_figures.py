"""Every registered figure (ioi.registry.FIGURES), drawn from the offline demo's CI results
(config/ci.yaml, the session fixture ``planted_demo``), as a reader would look at it:

* no two text elements overlap (titles, suptitles, axis and tick labels, legends, annotations,
  table cells), none is cut off by the saved image's edge, and no table cell's text runs over
  its cell (as saved: PNG, ``bbox_inches="tight"``);
* no number is printed in e-notation (``1.4e+02%``, ``+8.4e-12``): fixed format reads better;
* every layer x head heatmap outlines the circuit's heads (ioi.plots.common.outline_heads);
* titles name the model, never a machine path (a run on ``model_path: /some/dir``).

The rules are generic: a figure added to the registry is checked without touching this file.
"""

from __future__ import annotations

import copy
import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from figure_lint import (
    drawn_texts,
    exponent_numbers,
    overflowing_table_cells,
    overlapping_texts,
    texts_outside_figure,
    unoutlined_head_heatmaps,
)

from ioi.plots.common import OUTLINE_GID
from ioi.registry import FIGURES, resolve

pytestmark = pytest.mark.slow


def _inputs(results, name):
    base = results / FIGURES[name].experiment
    frame = pd.read_csv(base / "data.csv")
    summary = json.loads((base / "summary.json").read_text())
    meta = json.loads((base / "meta.json").read_text())
    return frame, summary, meta


def _draw(results, name, frame, summary, meta):
    """The figure as ioi.pipeline.plot_figure_job draws it (with its extra experiments' summaries)."""
    spec = FIGURES[name]
    if spec.extra_experiments:
        extra = {e: json.loads((results / e / "summary.json").read_text()) for e in spec.extra_experiments}
        return resolve(spec.plotter)(frame, summary, meta, extra=extra)
    return resolve(spec.plotter)(frame, summary, meta)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_reads_cleanly(planted_demo, name):
    frame, summary, meta = _inputs(planted_demo, name)
    fig = _draw(planted_demo, name, frame, summary, meta)
    try:
        texts = drawn_texts(fig)
        problems = (overlapping_texts(fig, texts) + texts_outside_figure(fig, texts) + overflowing_table_cells(fig, texts)
                    + exponent_numbers(texts) + unoutlined_head_heatmaps(fig, summary, OUTLINE_GID))
    finally:
        plt.close(fig)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("model_name", [None, "my-gpt2-run"])
def test_titles_name_a_local_checkpoint_never_its_path(planted_demo, model_name):
    """A run on ``model_path: /some/dir/gpt2-ckpt``: every figure names the model (model_name, or
    the folder's name), and no text shows the machine path."""
    for name in sorted(FIGURES):
        frame, summary, meta = _inputs(planted_demo, name)
        meta = copy.deepcopy(meta)
        meta["model"]["spec"] = "/some/dir/gpt2-ckpt"
        meta["model"]["source"] = "local:/some/dir/gpt2-ckpt"
        meta.pop("model_label", None)
        if model_name:
            meta["model_label"] = model_name
        fig = _draw(planted_demo, name, frame, summary, meta)
        try:
            texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        finally:
            plt.close(fig)
        shown = "\n".join(t for t in texts if isinstance(t, str))
        assert "/some/dir" not in shown, (name, [t for t in texts if "/some/dir" in str(t)])
        assert (model_name or "gpt2-ckpt") in shown, name


def test_interactive_attention_page_is_self_contained(planted_demo):
    """The workflow's interactive page (one per model, beside the static figures): circuitsvis's
    bundle inlined, every circuit head present, nothing fetched from the network."""
    from figure_lint import external_references

    from ioi.registry import PAGES

    figures = planted_demo.parents[1] / "figures" / planted_demo.name
    for name, spec in PAGES.items():
        page = (figures / f"{name}.html").read_text(encoding="utf-8")
        assert not external_references(page), external_references(page)
        assert "var CircuitsVis=" in page and "CircuitsVis.AttentionHeads" in page
        summary = json.loads((planted_demo / spec.experiment / "summary.json").read_text())
        classes = summary["circuit"]["classes"]
        for cls, heads in classes.items():
            assert f'data-class="{cls}"' in page, cls
            for head in heads:
                assert f"{head} ({cls})" in page, (cls, head)


def test_external_references_finds_what_a_browser_would_fetch():
    from figure_lint import external_references

    assert external_references('<script src="https://unpkg.com/x.js"></script>')
    assert external_references('<link rel="stylesheet" href="//cdn.example/x.css">')
    assert external_references('<script type="module">import { render } from "https://unpkg.com/cv.js";</script>')
    assert external_references('<script>import("https://unpkg.com/cv.js")</script>')
    assert not external_references('<a href="https://arxiv.org/abs/2211.00593">paper</a>'
                                   '<script>var u = "https://reactjs.org/docs/error-decoder.html";</script>')


def test_number_formats_and_model_names():
    """The helpers the rules rely on: fixed notation, ×10ⁿ only for tiny errors, no paths."""
    from figure_lint import E_NOTATION, SHORT_POWER

    from ioi.plots.common import model_label, num, sci

    assert [num(140.3, 2), num(3.5612), num(0.0696), num(8.4e-12, signed=True), num(-7.06e-5), num(3e-5)] == \
        ["140", "3.56", "0.0696", "0", "-0.0001", "0"]
    assert num(12345.6) == "12346" and num(-1.234, signed=True) == "-1.23" and num(None) == "n/a"
    assert [sci(0.0), sci(1.2e-7), sci(0.00123), sci(3.2e-12)] == ["0", "1.2×10⁻⁷", "0.0012", "3.2×10⁻¹²"]
    for text in (num(140.3, 2), sci(1.2e-7), sci(0.00123), sci(5e-5)):
        assert not E_NOTATION.search(text) and not SHORT_POWER.search(text), text
    assert E_NOTATION.search("1.4e+02%") and E_NOTATION.search("DLA +8.4e-12") and E_NOTATION.search("1e−7")
    assert not E_NOTATION.search("fig3e ABBA-1 hash 3e12ab")
    assert model_label({"model": {"spec": "/some/dir/gpt2"}}) == "gpt2 (local checkpoint)"
    assert model_label({"model": {"spec": "/some/dir/gpt2/"}, "model_label": "local-gpt2"}) == "gpt2 (local checkpoint)"
    assert model_label({"model": {"spec": "/some/dir/gpt2"}, "model_label": "run-a"}) == "run-a (local checkpoint)"
    assert model_label({"model": {"spec": "planted-ioi"}}) == "planted-circuit model (not GPT-2)"


def test_paper_constants_have_one_copy_read_by_experiments_and_plots():
    """The paper's numbers live in ioi.paper_values only: experiments and plots read the same
    objects, and that module imports no torch (figure jobs stay torch-free)."""
    import subprocess
    import sys

    from ioi import paper_values
    from ioi.experiments import circuit_eval as experiments
    from ioi.experiments import signals as signal_experiments
    from ioi.plots import circuit_eval as plots
    from ioi.plots import signals as signal_plots

    assert plots.PAPER_FIG20 is experiments.PAPER_FIG20 is paper_values.PAPER_FIG20
    assert plots.PAPER_FIG6_POINTS is experiments.PAPER_COMPLETENESS_POINTS
    assert plots.PAPER_FIG6_TEXT is experiments.PAPER_COMPLETENESS_TEXT
    assert (plots.PAPER_RATIO_TEXT, plots.PAPER_GAP_TEXT, plots.PAPER_F_M_TEXT) == (0.87, 0.46, 3.56)
    assert signal_plots.PAPER_FIG9 is signal_experiments.PAPER_FIG9
    assert signal_plots.PAPER_FIG8["extra_io"] == (1.23, 0.36, 0.234)
    assert signal_experiments.PAPER_FIG8["extra_io"]["logit_diff_mean"] == 1.23
    code = "import sys, ioi.paper_values, ioi.plots.circuit_eval, ioi.plots.signals; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_figure_and_page_code_imports_no_torch():
    """Figure and page jobs load no torch (seconds per job, not a model's worth of imports)."""
    import subprocess
    import sys

    code = ("import sys; from ioi.registry import FIGURES, PAGES, resolve; "
            "[resolve(s.plotter) for s in FIGURES.values()]; [resolve(s.writer) for s in PAGES.values()]; "
            "from ioi.plots.interactive import circuitsvis_bundle; circuitsvis_bundle(); "
            "import ioi.pipeline; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'circuitsvis')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_lint_catches_each_defect_on_a_synthetic_figure():
    """Each check fires on the defect it names (a check that cannot fail is worse than none)."""
    import numpy as np

    fig, (ax, ax_table) = plt.subplots(1, 2, figsize=(6, 3))
    ax.set_title("left title\nwith a second line\nand a third")
    fig.suptitle("figure title", x=0.3, y=0.97, va="top")  # on top of the left axes title
    ax.imshow(np.zeros((4, 4)))
    ax.set_xlabel("value 1.4e+02%")
    ax_table.axis("off")
    table = ax_table.table(cellText=[["a text far too long for its narrow cell", "x"]], loc="center",
                           colWidths=[0.1, 0.1])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    try:
        texts = drawn_texts(fig)
        overlaps = overlapping_texts(fig, texts)
        cells = overflowing_table_cells(fig, texts)
        numbers = exponent_numbers(texts)
        outlines = unoutlined_head_heatmaps(fig, {"n_layers": 4, "n_heads": 4,
                                                  "circuit": {"classes": {"name mover": ["3.1"]}}}, OUTLINE_GID)
    finally:
        plt.close(fig)
    assert any("figure title" in p and "left title" in p for p in overlaps), overlaps
    assert any("far too long" in p for p in cells) and not any("'x'" in p for p in cells), cells
    assert numbers and "1.4e+02" in numbers[0], numbers
    assert outlines and "outlines no circuit head" in outlines[0], outlines


def test_the_exponent_lint_agrees_with_the_colour_scale_rule():
    """A colour scale factors out the power of ten below 1e-3 and from 1e5 up
    (ioi.plots.common._display_exponent); the lint accepts exactly those labels and flags the
    ×10ⁿ form where fixed ticks read as well (10⁻³ .. 10⁴)."""
    import math

    from figure_lint import SHORT_POWER

    from ioi.plots.common import _SUPERSCRIPT, _display_exponent

    for bound in (9.9e-4, 1e-4, 3e-5, 2e-7, 1e5, 4e12):
        exponent = _display_exponent(bound)
        assert exponent == math.floor(math.log10(bound))
        assert not SHORT_POWER.search(f"(×10{str(exponent).translate(_SUPERSCRIPT)})"), bound
    for bound in (1e-3, 0.5, 12.0, 9.9e4):
        assert _display_exponent(bound) == 0
    for exponent in (-3, -2, -1, 0, 1, 2, 3, 4):
        assert SHORT_POWER.search(f"×10{str(exponent).translate(_SUPERSCRIPT)}"), exponent

"""The figure gallery (figures/{model}/README.md, ioi.gallery): every registered figure with its
caption, the paper's statements and this model's verdicts, in the paper's order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ioi.comparison import evaluate_reference
from ioi.gallery import paper_order, render_gallery
from ioi.registry import FIGURES, FigureSpec

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "paper_reference.yaml"
PLANTED = REPO / "tests" / "replication" / "planted_reference.yaml"


def _sections(markdown: str) -> list[str]:
    return re.findall(r"^## (\S+)$", markdown, flags=re.M)[1:]  # after "## Contents"


def test_paper_order_follows_the_paper():
    order = [spec.name for spec in paper_order()]
    assert sorted(order) == sorted(FIGURES)
    assert order[0] == "baseline_logit_diff"  # §2 first
    position = order.index
    assert position("fig3b_path_patching_logits") < position("fig3c_attention_vs_projection") \
        < position("fig4b_path_patching_nm_queries") < position("fig5b_path_patching_sinh_values") \
        < position("fig15_backup_name_movers") < position("faithfulness") < position("fig6_completeness") \
        < position("fig7_minimality") < position("fig12b_path_patching_sinh_keys")
    paper = [s.name for s in FIGURES.values() if s.category in ("Section 2", "Section 3", "Section 4", "Appendix")]
    assert sorted(order[:len(paper)]) == sorted(paper)  # the paper's figures first
    seed = [s.name for s in FIGURES.values() if s.category == "Seed notebook"]
    assert order[len(paper):len(paper) + len(seed)] == seed  # then the seed notebook's, in its order


def test_gallery_picks_up_a_figure_added_later(tmp_path):
    """Generic over the registry: a new figure appears, with its caption, the paper's claims on its
    experiment and NOT RUN verdicts when nothing has run."""
    extra = FigureSpec("fig99_new_analysis", "fig3b", "ioi.plots.path_figures:fig3b",
                       "A caption with *stars*, a | bar and snake_case.", "Section 3")
    text = render_gallery(model_label="nothing-run", results_dir=tmp_path, paper_reference=PAPER,
                          model_reference=PAPER, figures=[*FIGURES.values(), extra])
    assert _sections(text) == [spec.name for spec in paper_order([*FIGURES.values(), extra])]
    block = text.split("## fig99_new_analysis")[1].split("\n## ")[0]
    assert "![fig99_new_analysis](fig99_new_analysis.png)" in block
    assert r"A caption with \*stars\*, a \| bar and snake\_case." in block
    assert "fig3b\\_top5\\_heads" not in block and "`fig3b_top5_heads`" in block  # the verdict row
    assert "| NOT RUN (experiment `fig3b` not run" in block
    assert "Made by commit `not run`" in block
    assert "not the paper's" not in text  # GPT-2: the paper's claims are this model's claims


@pytest.mark.slow
def test_ci_demo_gallery(planted_demo):
    """The rule's output for the CI demo: every figure, its PNG beside it, and exactly the verdicts
    of results/planted-ioi-ci/paper_comparison.md."""
    gallery = REPO / "figures" / "planted-ioi-ci" / "README.md"
    text = gallery.read_text()
    assert _sections(text) == [spec.name for spec in paper_order()]
    for name in FIGURES:
        assert f"![{name}]({name}.png)" in text
        assert (gallery.parent / f"{name}.png").exists()
    table = (planted_demo / "paper_comparison.md").read_text()
    for outcome in evaluate_reference(PLANTED, planted_demo):
        assert f"`{outcome.claim_id}` |" in table
        rows = [line for line in text.splitlines() if line.startswith(f"| `{outcome.claim_id}` |")]
        assert rows, outcome.claim_id
        assert all(row.rstrip(" |").split("| ")[-1].startswith(outcome.status) for row in rows), rows
    assert "Made by commit `" in text and "Made by commit `not run`" not in text
    assert "planted_reference.yaml" in text  # says whose claims these are

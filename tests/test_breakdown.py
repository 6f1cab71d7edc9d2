"""ioi.breakdown on hand-computable inputs: per-template / per-order means, ratios of means, Wilson
fractions, per-group top heads, the table rows, the secondary comparison table and the figure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ioi.breakdown import (
    breakdown_fraction,
    breakdown_heads,
    breakdown_many,
    breakdown_mean,
    breakdown_ratio,
    breakdown_rows,
    wilson_interval,
)
from ioi.comparison import breakdown_tables

LABELS = {
    "template": ["ABBA-0", "ABBA-0", "BABA-0", "BABA-0", "BABA-1", "BABA-1"],
    "order": ["ABBA", "ABBA", "BABA", "BABA", "BABA", "BABA"],
}


def test_mean_by_template_and_order():
    bd = breakdown_mean([1, 2, 3, 4, 5, 6], LABELS, seed=0)
    assert bd["overall"]["value"] == pytest.approx(3.5) and bd["overall"]["n"] == 6
    assert {g: e["value"] for g, e in bd["by_template"].items()} == {"ABBA-0": 1.5, "BABA-0": 3.5, "BABA-1": 5.5}
    assert {g: e["value"] for g, e in bd["by_order"].items()} == {"ABBA": 1.5, "BABA": 4.5}
    assert bd["by_order"]["BABA"]["n"] == 4
    assert bd["spread"] == {"min": 1.5, "min_group": "ABBA-0", "max": 5.5, "max_group": "BABA-1"}
    for entry in [bd["overall"], *bd["by_template"].values(), *bd["by_order"].values()]:
        low, high = entry["ci"]
        assert low <= entry["value"] <= high
    # Two prompts (1, 2): the bootstrap means are 1, 1.5 or 2.
    assert bd["by_template"]["ABBA-0"]["ci"][0] >= 1.0 and bd["by_template"]["ABBA-0"]["ci"][1] <= 2.0


def test_single_prompt_group_has_no_ci():
    labels = {"template": ["ABBA-0", "BABA-0", "BABA-0"], "order": ["ABBA", "BABA", "BABA"]}
    bd = breakdown_mean([1.0, 2.0, 4.0], labels)
    assert bd["by_template"]["ABBA-0"] == {"value": 1.0, "ci": [None, None], "n": 1}


def test_ratio_is_a_ratio_of_means():
    labels = {"template": ["ABBA-0"] * 2 + ["BABA-0"] * 2, "order": ["ABBA"] * 2 + ["BABA"] * 2}
    bd = breakdown_ratio([1, 2, 3, 6], [2, 1, 4, 4], labels)
    # ABBA-0: (1 + 2) / (2 + 1) = 1, although the mean of the per-prompt ratios is 1.25.
    assert bd["by_template"]["ABBA-0"]["value"] == pytest.approx(1.0)
    assert bd["by_template"]["BABA-0"]["value"] == pytest.approx(9 / 8)
    assert bd["overall"]["value"] == pytest.approx(12 / 11)
    with pytest.raises(ValueError, match="shape"):
        breakdown_ratio([1, 2], [1, 2, 3], labels)


def test_fraction_has_wilson_interval():
    labels = {"template": ["ABBA-0", "BABA-0"], "order": ["ABBA", "BABA"]}
    bd = breakdown_fraction([3, 0], [3, 3], labels)
    assert bd["overall"]["value"] == pytest.approx(0.5)
    assert bd["overall"]["ci"] == pytest.approx([0.18761, 0.81239], abs=1e-4)  # 3 of 6, z = 1.96
    assert bd["by_template"]["ABBA-0"]["value"] == 1.0 and bd["by_template"]["BABA-0"]["value"] == 0.0
    assert wilson_interval(0, 0) == [None, None]


def test_many_quantities_one_call_per_group():
    calls = []

    def compute(rows):
        calls.append(tuple(rows))
        return {"a": {"value": float(len(rows)), "ci": [None, None], "n": len(rows)},
                "b": {"value": float(sum(rows)), "ci": [None, None], "n": len(rows)}}

    out = breakdown_many(compute, 6, LABELS, statistic="count")
    assert len(calls) == 1 + 3 + 2  # overall, three templates, two orders
    assert out["a"]["by_order"]["BABA"]["value"] == 4.0
    assert out["b"]["by_template"]["BABA-1"]["value"] == 4 + 5
    assert out["a"]["spread"]["min_group"] == "ABBA-0"


def test_heads_per_group():
    labels = {"template": ["ABBA-0"] * 2 + ["BABA-0"] * 2, "order": ["ABBA"] * 2 + ["BABA"] * 2}
    clean = np.array([2.0, 2.0, 4.0, 4.0])
    patched = np.array([[[1.0, 1.0, 4.0, 4.0], [2.0, 2.0, 2.0, 2.0]]])  # [1 layer, 2 heads, 4]
    bd = breakdown_heads(patched, clean, labels, k=1)
    assert bd["by_template"]["ABBA-0"]["top"] == ["0.0"]
    assert bd["by_template"]["ABBA-0"]["effect"]["0.0"] == pytest.approx(-50.0)
    assert bd["by_template"]["BABA-0"]["top"] == ["0.1"]
    assert bd["by_template"]["BABA-0"]["effect"]["0.1"] == pytest.approx(-50.0)
    # All prompts: mean clean 3; head 0 -> 2.5 (-16.7%), head 1 -> 2 (-33.3%).
    assert bd["overall"]["top"] == ["0.1"] and bd["overall"]["effect"]["0.1"] == pytest.approx(-100 / 3)
    by_abs = breakdown_heads(-patched + 2 * clean, clean, labels, k=2, order="abs")
    assert set(by_abs["overall"]["top"]) == {"0.0", "0.1"}
    nan = patched.copy()
    nan[0, 1] = np.nan  # an unreachable sender never ranks
    assert breakdown_heads(nan, clean, labels, k=2)["overall"]["top"] == ["0.0"]


def test_labels_must_match_the_values():
    with pytest.raises(ValueError, match="labels for"):
        breakdown_mean([1.0, 2.0], LABELS)
    with pytest.raises(ValueError, match="'order'"):
        breakdown_mean([1.0] * 6, {"template": LABELS["template"]})


def test_rows_tables_and_not_run(tmp_path):
    summary = {"breakdown": {"x": breakdown_mean([1, 2, 3, 4, 5, 6], LABELS)}}
    rows = breakdown_rows("toy", summary)
    assert rows[0]["quantity"] == "x" and rows[0]["ABBA"].startswith("1.5")
    assert rows[0]["templates"]["BABA-1"].startswith("5.5") and "ABBA-0" in rows[0]["spread"]
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "summary.json").write_text(json.dumps(summary))
    table = breakdown_tables(tmp_path, ["toy", "absent"])
    assert "| `toy` | x | mean | 3.5" in table and "BABA-1" in table
    assert "NOT RUN (no results): `absent`" in table
    assert "NOT RUN: no breakdowns" in breakdown_tables(tmp_path / "nothing", ["toy"])


def test_breakdown_figure_draws_every_scalar_panel():
    from ioi.plots.breakdown import breakdowns

    bd = breakdown_mean([1, 2, 3, 4, 5, 6], LABELS)
    heads = breakdown_heads(np.zeros((1, 2, 6)), np.ones(6), LABELS)
    fig = breakdowns(None, {"breakdown": {"logit_diff": bd, "effect": heads}},
                     {"experiment": "baseline", "model": {"spec": "planted-ioi"}, "N": 6},
                     extra={"faithfulness": {"breakdown": {"faithfulness_ratio": bd}}})
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any(t.startswith("baseline: logit_diff") for t in titles)
    assert any(t.startswith("faithfulness: faithfulness_ratio") for t in titles)
    assert not any("effect" in t for t in titles)  # sweeps are tables, not panels

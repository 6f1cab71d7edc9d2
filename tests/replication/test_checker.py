"""The claim checker itself: each check kind passes on a toy result that satisfies it and fails on
a mutated one (wrong sign, wrong top head, out-of-tolerance number), and absent results are NOT RUN.

The toy values below are made-up inputs for the checker, not results of any model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ioi.comparison import FAIL, NOT_RUN, PASS, evaluate_claim, evaluate_reference, render_markdown

ROOT = Path(__file__).resolve().parents[2]


def _write(results: Path, experiment: str, summary: dict) -> None:
    (results / experiment).mkdir(parents=True, exist_ok=True)
    (results / experiment / "summary.json").write_text(json.dumps(summary))


def _claim(kind_check: dict, key: str = "value", paper_value=None) -> dict:
    return {"id": "toy", "section": "toy", "statement": "toy", "paper_value": paper_value,
            "source": {"experiment": "toy", "key": key}, "check": kind_check}


TOY_HEADS = {"0.0": -3.0, "0.1": -2.0, "1.0": 2.5, "1.1": 0.1, "2.0": 0.05, "2.1": -0.2}


@pytest.mark.parametrize(
    "check, good, bad",
    [
        ({"kind": "abs", "value": 1.0, "tolerance": 0.1}, 1.05, 1.2),
        ({"kind": "range", "low": 0.8, "high": 0.9}, 0.85, 0.95),
        ({"kind": "at_least", "bound": 2.0}, 2.5, 1.5),
        ({"kind": "at_most", "bound": 0.2}, 0.1, 0.3),
    ],
)
def test_numeric_checks_catch_out_of_tolerance(tmp_path, check, good, bad):
    _write(tmp_path, "toy", {"value": good})
    assert evaluate_claim(_claim(check), tmp_path).status == PASS
    _write(tmp_path, "toy", {"value": bad})
    assert evaluate_claim(_claim(check), tmp_path).status == FAIL


def test_all_at_least_checks_only_its_heads_and_reports_the_others(tmp_path):
    """Fig. 3c: rho > 0.81 is the plotted head's; the other name movers are reported, not checked."""
    check = {"kind": "all_at_least", "heads": ["1.0"], "bound": 2.0, "report": ["0.0", "1.1"]}
    _write(tmp_path, "toy", {"value": TOY_HEADS})
    outcome = evaluate_claim(_claim(check), tmp_path)
    assert outcome.status == PASS and "0.0: -3" in outcome.ours and "1.1: 0.1" in outcome.ours
    _write(tmp_path, "toy", {"value": dict(TOY_HEADS, **{"1.0": 1.9})})
    assert evaluate_claim(_claim(check), tmp_path).status == FAIL


def test_top_k_exact_catches_wrong_top_head_and_wrong_sign(tmp_path):
    check = {"kind": "top_k_exact", "k": 3, "heads": ["0.0", "0.1", "1.0"],
             "signs": {"0.0": -1, "0.1": -1, "1.0": 1}}
    _write(tmp_path, "toy", {"value": TOY_HEADS})
    assert evaluate_claim(_claim(check), tmp_path).status == PASS
    wrong_top = dict(TOY_HEADS, **{"2.1": -5.0})
    _write(tmp_path, "toy", {"value": wrong_top})
    assert evaluate_claim(_claim(check), tmp_path).status == FAIL
    wrong_sign = dict(TOY_HEADS, **{"1.0": -2.5})
    _write(tmp_path, "toy", {"value": wrong_sign})
    outcome = evaluate_claim(_claim(check), tmp_path)
    assert outcome.status == FAIL and "wrong sign" in outcome.reason


def test_in_extreme_rank_sign_and_threshold_checks(tmp_path):
    _write(tmp_path, "toy", {"value": TOY_HEADS})
    extreme = {"kind": "in_extreme", "side": "negative", "k": 2, "heads": ["0.0", "0.1"]}
    rank = {"kind": "rank_at_most", "heads": ["1.0"], "k": 1}
    sign = {"kind": "sign", "signs": {"0.0": -1, "1.0": 1}}
    above = {"kind": "all_at_least", "heads": ["1.0", "1.1"], "bound": 0.1}
    for check in (extreme, rank, sign, above):
        assert evaluate_claim(_claim(check), tmp_path).status == PASS, check
    mutated = dict(TOY_HEADS, **{"0.1": 0.5, "1.0": -0.01, "1.1": 0.0})
    _write(tmp_path, "toy", {"value": mutated})
    for check in (extreme, rank, sign, above):
        assert evaluate_claim(_claim(check), tmp_path).status == FAIL, check


def test_cell_checks(tmp_path):
    paper = {"a": 3.0, "b": -1.0}
    _write(tmp_path, "toy", {"value": {"a": 3.1, "b": -0.8}})
    cells = {"kind": "cells_abs", "tolerance": 0.35, "baseline_cell": "a", "baseline_tolerance": 0.2}
    assert evaluate_claim(_claim(cells, paper_value=paper), tmp_path).status == PASS
    assert evaluate_claim(_claim({"kind": "sign_match"}, paper_value=paper), tmp_path).status == PASS
    _write(tmp_path, "toy", {"value": {"a": 3.1, "b": 0.2}})
    assert evaluate_claim(_claim(cells, paper_value=paper), tmp_path).status == FAIL
    assert evaluate_claim(_claim({"kind": "sign_match"}, paper_value=paper), tmp_path).status == FAIL


def test_compare_and_nested_keys(tmp_path):
    _write(tmp_path, "toy", {"control": {"ld": 3.0}, "clean": {"ld": 2.95}})
    check = {"kind": "compare", "op": ">", "other": {"experiment": "toy", "key": "clean.ld"}, "margin": -0.1}
    assert evaluate_claim(_claim(check, key="control.ld"), tmp_path).status == PASS
    _write(tmp_path, "toy", {"control": {"ld": 2.5}, "clean": {"ld": 2.95}})
    assert evaluate_claim(_claim(check, key="control.ld"), tmp_path).status == FAIL


def test_missing_results_are_not_run_with_reason(tmp_path):
    outcome = evaluate_claim(_claim({"kind": "abs", "value": 1, "tolerance": 1}), tmp_path)
    assert outcome.status == NOT_RUN and "not run" in outcome.reason
    _write(tmp_path, "toy", {"other": 1})
    outcome = evaluate_claim(_claim({"kind": "abs", "value": 1, "tolerance": 1}), tmp_path)
    assert outcome.status == NOT_RUN and "no key" in outcome.reason


def test_confidence_interval_is_reported(tmp_path):
    _write(tmp_path, "toy", {"value": 1.0, "value_ci": [0.9, 1.1]})
    outcome = evaluate_claim(_claim({"kind": "abs", "value": 1.0, "tolerance": 0.1}), tmp_path)
    assert "95% CI 0.9–1.1" in outcome.ours


def test_committed_comparison_is_generated_and_claims_nothing_for_gpt2(tmp_path):
    """paper_comparison.md is exactly what the generator writes from the (absent) GPT-2 results."""
    from ioi.__main__ import write_comparison

    out = tmp_path / "paper_comparison.md"
    write_comparison(ROOT / "paper_reference.yaml", ROOT / "results" / "gpt2-small", out,
                     model_label="GPT-2 small")
    if (ROOT / "results" / "gpt2-small").exists():
        pytest.skip("GPT-2 small results exist locally; the committed file may differ")
    assert out.read_text() == (ROOT / "paper_comparison.md").read_text()
    outcomes = evaluate_reference(ROOT / "paper_reference.yaml", tmp_path / "nothing")
    assert {o.status for o in outcomes} == {NOT_RUN}
    assert "PASS" not in render_markdown(outcomes, model_label="x", results_dir="r", figures_dir="f").split("claims.")[1]


def test_margins_over_the_next_best_head(tmp_path):
    _write(tmp_path, "toy", {"value": TOY_HEADS})
    # negative side: 0.1 (-2.0) is the weaker expected head, 2.1 (-0.2) the closest other: gap 1.8
    extreme = {"kind": "in_extreme", "side": "negative", "k": 2, "heads": ["0.0", "0.1"], "margin": 1.5}
    # by |value|: 0.1 (2.0) weakest of the three, 2.1 (0.2) the largest other: gap 1.8
    top = {"kind": "top_k_exact", "k": 3, "heads": ["0.0", "0.1", "1.0"], "margin": 1.5}
    for check in (extreme, top):
        assert evaluate_claim(_claim(check), tmp_path).status == PASS, check
        outcome = evaluate_claim(_claim(dict(check, margin=1.9)), tmp_path)
        assert outcome.status == FAIL and "margin 1.8 < 1.9 (0.1 vs 2.1)" in outcome.reason, outcome.reason
    # the right heads on top, but a runner-up too close: the margin catches it
    close = dict(TOY_HEADS, **{"2.1": -1.9})
    _write(tmp_path, "toy", {"value": close})
    for check in (extreme, top):
        assert evaluate_claim(_claim(check), tmp_path).status == FAIL, check


def test_compare_with_a_factor(tmp_path):
    """``factor`` scales the other value: a null path's largest effect against a quarter of the
    significant path's."""
    _write(tmp_path, "toy", {"null": 2.0, "significant": 10.0})
    check = {"kind": "compare", "op": "<=", "factor": 0.25, "other": {"experiment": "toy", "key": "significant"}}
    outcome = evaluate_claim(_claim(check, key="null"), tmp_path)
    assert outcome.status == PASS and "0.25 x other" in outcome.tolerance
    _write(tmp_path, "toy", {"null": 3.0, "significant": 10.0})
    assert evaluate_claim(_claim(check, key="null"), tmp_path).status == FAIL

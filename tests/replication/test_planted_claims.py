"""Ground truth: the offline demo (planted model, config/ci.yaml) passes every claim of
tests/replication/planted_reference.yaml, and the checker catches mutated results.

Mutations (wrong sign, wrong top head, out-of-tolerance number) are applied to a copy of the
demo's real summaries, so the checker is shown to fail on exactly the errors it must catch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ioi.comparison import FAIL, PASS, evaluate_claim, load_reference

REFERENCE = Path(__file__).with_name("planted_reference.yaml")
CLAIMS = load_reference(REFERENCE)["claims"]
BY_ID = {claim["id"]: claim for claim in CLAIMS}


@pytest.mark.slow
@pytest.mark.parametrize("claim", CLAIMS, ids=[c["id"] for c in CLAIMS])
def test_planted_claim(claim, planted_demo):
    outcome = evaluate_claim(claim, planted_demo)
    assert outcome.status == PASS, f"{claim['id']}: ours {outcome.ours} ({outcome.status}) {outcome.reason}"


def _mutate(results: Path, tmp_path: Path, experiment: str, edit) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    path = copy / experiment / "summary.json"
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))
    return copy


@pytest.mark.slow
def test_checker_catches_wrong_sign(planted_demo, tmp_path):
    def flip(summary):
        summary["effect"]["3.1"] = -summary["effect"]["3.1"]

    mutated = _mutate(planted_demo, tmp_path, "fig3b", flip)
    assert evaluate_claim(BY_ID["planted_fig3b_top2"], mutated).status == FAIL


@pytest.mark.slow
def test_checker_catches_wrong_top_head(planted_demo, tmp_path):
    def promote_idle(summary):
        biggest = max(abs(v) for v in summary["effect"].values() if v is not None)
        summary["effect"]["0.0"] = -2 * biggest

    mutated = _mutate(planted_demo, tmp_path, "fig4b", promote_idle)
    assert evaluate_claim(BY_ID["planted_fig4b_sinh"], mutated).status == FAIL


@pytest.mark.slow
def test_checker_catches_out_of_tolerance_number(planted_demo, tmp_path):
    def halve(summary):
        summary["faithfulness_ratio"] = 0.5 * summary["faithfulness_ratio"]

    mutated = _mutate(planted_demo, tmp_path, "faithfulness", halve)
    assert evaluate_claim(BY_ID["planted_faithfulness"], mutated).status == FAIL


@pytest.mark.slow
def test_checker_catches_a_wrong_edge_circuit(planted_demo, tmp_path):
    """An ACDC circuit with one edge too many, or a worse EAP-IG ranking, fails its claim."""
    def extra_edge(summary):
        summary["acdc_exact"] = 0.0
        summary["acdc_extra"] = ["a1.h0->a3.h1.k"]

    mutated = _mutate(planted_demo, tmp_path, "edge_circuits", extra_edge)
    assert evaluate_claim(BY_ID["planted_edges_acdc_exact"], mutated).status == FAIL

    def worse_ranking(summary):
        summary["auc"]["eap_ig"] = 0.9

    mutated = _mutate(planted_demo, tmp_path / "second", "edge_circuits", worse_ranking)
    assert evaluate_claim(BY_ID["planted_edges_auc_eap_ig"], mutated).status == FAIL

"""Tolerance tests: every claim of the reference file, checked against a results folder.

    pytest tests/replication --results results/gpt2-small

A claim whose results are absent is skipped with the reason (NOT RUN); nothing is assumed. A run that
claims to be GPT-2 small but failed the identity check (ioi.identity: the seed's 8 prompts against
ARENA's published values) has every claim skipped with that reason (WITHHELD).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ioi.comparison import FAIL, NOT_RUN, WITHHELD, evaluate_claim, load_reference

REFERENCE = Path(__file__).resolve().parents[2] / "paper_reference.yaml"
CLAIMS = load_reference(REFERENCE)["claims"]


@pytest.mark.parametrize("claim", CLAIMS, ids=[c["id"] for c in CLAIMS])
def test_paper_claim(claim, request):
    reference = Path(request.config.getoption("--reference"))
    if reference.resolve() != REFERENCE.resolve():
        claims = {c["id"]: c for c in load_reference(reference)["claims"]}
        if claim["id"] not in claims:
            pytest.skip(f"claim not in {reference}")
        claim = claims[claim["id"]]
    outcome = evaluate_claim(claim, request.config.getoption("--results"))
    if outcome.status == NOT_RUN:
        pytest.skip(f"NOT RUN: {outcome.reason}")
    if outcome.status == WITHHELD:
        pytest.skip(f"WITHHELD: {outcome.reason}")
    assert outcome.status != FAIL, (
        f"{claim['id']} ({claim['section']}): ours {outcome.ours}, paper {claim.get('paper_value')}, "
        f"tolerance {outcome.tolerance}. {outcome.reason}"
    )

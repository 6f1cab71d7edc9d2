"""The circuit data match the paper: 26 heads in 7 classes, the naive circuit, Fig. 20 K sets."""

from __future__ import annotations

import pytest

from ioi.circuits import (
    NAIVE_CIRCUIT,
    PAPER_CIRCUIT,
    PAPER_GREEDY_SETS,
    PAPER_MINIMALITY_K,
    minimality_k_sets,
)


def test_paper_circuit_has_26_heads_in_7_classes():
    assert len(PAPER_CIRCUIT.heads()) == 26
    assert len(PAPER_CIRCUIT.classes) == 7
    sizes = {cls: len(heads) for cls, heads in PAPER_CIRCUIT.classes.items()}
    assert sizes == {"name mover": 3, "backup name mover": 8, "negative name mover": 2,
                     "s-inhibition": 4, "induction": 4, "duplicate token": 3, "previous token": 2}
    assert PAPER_CIRCUIT.position_of((9, 9)) == "END"
    assert PAPER_CIRCUIT.position_of((5, 5)) == "S2"
    assert PAPER_CIRCUIT.position_of((2, 2)) == "S1+1"
    # 26 of 144 heads x ~ (paper) positions: every head lies in GPT-2 small.
    PAPER_CIRCUIT.validate(12, 12)
    with pytest.raises(ValueError, match="does not exist"):
        PAPER_CIRCUIT.validate(4, 4)


def test_naive_circuit_is_the_paper_codes():
    assert len(NAIVE_CIRCUIT.heads()) == 13
    assert set(NAIVE_CIRCUIT.heads()) <= set(PAPER_CIRCUIT.heads())
    assert "negative name mover" not in NAIVE_CIRCUIT.classes


def test_minimality_k_sets_reproduce_fig20_chain():
    assert set(PAPER_MINIMALITY_K) == set(PAPER_CIRCUIT.heads())
    for head, k in PAPER_MINIMALITY_K.items():
        assert head not in k and k <= set(PAPER_CIRCUIT.heads())
    assert PAPER_MINIMALITY_K[(9, 9)] == frozenset()
    assert PAPER_MINIMALITY_K[(9, 6)] == {(9, 9), (10, 0)}
    assert PAPER_MINIMALITY_K[(5, 9)] == {(10, 7), (11, 10)}
    assert PAPER_MINIMALITY_K[(8, 10)] == {(7, 3), (7, 9), (8, 6)}
    # "All previous NMs and backup NMs": 11.2's set is the prefix ending at 10.1.
    assert PAPER_MINIMALITY_K[(11, 2)] == {(9, 9), (10, 0), (9, 6), (10, 10), (10, 6), (10, 2), (10, 1)}
    assert minimality_k_sets(PAPER_CIRCUIT) == PAPER_MINIMALITY_K


def test_minimality_k_for_9_0_and_11_9_is_all_name_movers_and_negatives():
    """Paper code minimality.py: K[(9,0)] = K[(11,9)] = CIRCUIT["name mover"] (all 11, backups
    included) + CIRCUIT["negative"], so K ∪ {v} is one 13-head set for both heads."""
    union_90 = PAPER_MINIMALITY_K[(9, 0)] | {(9, 0)}
    union_119 = PAPER_MINIMALITY_K[(11, 9)] | {(11, 9)}
    assert union_90 == union_119
    assert len(union_90) == 13
    assert union_90 == set(PAPER_CIRCUIT.classes["name mover"]) | set(
        PAPER_CIRCUIT.classes["backup name mover"]) | set(PAPER_CIRCUIT.classes["negative name mover"])
    assert (11, 9) in PAPER_MINIMALITY_K[(9, 0)] and (9, 0) in PAPER_MINIMALITY_K[(11, 9)]


def test_greedy_sets_are_inside_the_circuit():
    for k in PAPER_GREEDY_SETS:
        assert k <= set(PAPER_CIRCUIT.heads())

"""The paper's circuit as data: head classes, the positions where each class is kept, the naive
circuit, the minimality K sets (Fig. 20) and the greedy completeness sets (Fig. 22).

Heads are ``(layer, head)``, 0-indexed (the paper's ``9.9`` is ``(9, 9)``). Sources: ioi_paper.md §2
(classes, from the paper's Fig. 20 and Appendix F; identical to the paper code's ``CIRCUIT``),
§4.3 (naive circuit from the paper code's ``NAIVE``, Fig. 22 sets), §4.4 (Fig. 20 K sets).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

Head = tuple[int, int]

# Class names used throughout (figures colour heads by these).
NAME_MOVER = "name mover"
BACKUP_NAME_MOVER = "backup name mover"
NEGATIVE_NAME_MOVER = "negative name mover"
S_INHIBITION = "s-inhibition"
INDUCTION = "induction"
DUPLICATE_TOKEN = "duplicate token"
PREVIOUS_TOKEN = "previous token"

CLASS_ORDER = (
    NAME_MOVER,
    BACKUP_NAME_MOVER,
    NEGATIVE_NAME_MOVER,
    S_INHIBITION,
    INDUCTION,
    DUPLICATE_TOKEN,
    PREVIOUS_TOKEN,
)

# The position (a key of IOIDataset.word_idx) at which each class's node is kept (paper code
# RELEVANT_TOKENS: name movers, backups, negatives, S-inhibition at END; induction and duplicate
# token heads at S2; previous token heads at S1+1).
RELEVANT_POSITIONS: dict[str, str] = {
    NAME_MOVER: "END",
    BACKUP_NAME_MOVER: "END",
    NEGATIVE_NAME_MOVER: "END",
    S_INHIBITION: "END",
    INDUCTION: "S2",
    DUPLICATE_TOKEN: "S2",
    PREVIOUS_TOKEN: "S1+1",
}


@dataclasses.dataclass(frozen=True)
class Circuit:
    """Head classes of a circuit and the dataset position where each class is kept."""

    name: str
    classes: Mapping[str, tuple[Head, ...]]
    relevant_positions: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(RELEVANT_POSITIONS)
    )

    def heads(self) -> list[Head]:
        """All heads, in class order then listed order, without duplicates."""
        seen: dict[Head, None] = {}
        for cls in self.class_names():
            for head in self.classes[cls]:
                seen.setdefault(tuple(head), None)
        return list(seen)

    def class_names(self) -> list[str]:
        known = [c for c in CLASS_ORDER if c in self.classes]
        return known + [c for c in self.classes if c not in known]

    def class_of(self, head: Head) -> str | None:
        for cls in self.class_names():
            if tuple(head) in {tuple(h) for h in self.classes[cls]}:
                return cls
        return None

    def position_of(self, head: Head) -> str:
        """The dataset position key at which ``head`` is kept."""
        cls = self.class_of(head)
        if cls is None:
            raise KeyError(f"Head {head} is not in circuit {self.name!r}.")
        return self.relevant_positions[cls]

    def heads_with_positions(self) -> dict[Head, str]:
        return {head: self.position_of(head) for head in self.heads()}

    def validate(self, n_layers: int, n_heads: int) -> None:
        """Raise a clear error if a head does not exist in a model of this shape."""
        for head in self.heads():
            layer, index = head
            if not (0 <= layer < n_layers and 0 <= index < n_heads):
                raise ValueError(
                    f"Circuit {self.name!r} names head {layer}.{index}, which does not exist in a "
                    f"model with {n_layers} layers x {n_heads} heads. Use the circuit that belongs to "
                    "the model (the paper's for GPT-2 small, ioi.planted.CIRCUIT for planted-ioi)."
                )


# Name movers listed "by importance" as in the paper code (the minimality prefixes use this order).
PAPER_CIRCUIT = Circuit(
    name="paper",
    classes={
        NAME_MOVER: ((9, 9), (10, 0), (9, 6)),
        BACKUP_NAME_MOVER: ((10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)),
        NEGATIVE_NAME_MOVER: ((10, 7), (11, 10)),
        S_INHIBITION: ((7, 3), (7, 9), (8, 6), (8, 10)),
        INDUCTION: ((5, 5), (5, 8), (5, 9), (6, 9)),
        DUPLICATE_TOKEN: ((0, 1), (0, 10), (3, 0)),
        PREVIOUS_TOKEN: ((2, 2), (4, 11)),
    },
)

# The paper code's NAIVE circuit (13 heads): no backup, no negative name movers.
NAIVE_CIRCUIT = Circuit(
    name="naive",
    classes={
        NAME_MOVER: ((9, 6), (9, 9), (10, 0)),
        S_INHIBITION: ((7, 3), (7, 9), (8, 6), (8, 10)),
        INDUCTION: ((5, 5), (5, 9)),
        DUPLICATE_TOKEN: ((3, 0), (0, 10)),
        PREVIOUS_TOKEN: ((2, 2), (4, 11)),
    },
)

# The paper code's "name mover" class for completeness is all 11 main + backup name movers.
PAPER_NAME_MOVERS_BY_IMPORTANCE: tuple[Head, ...] = (
    (9, 9), (10, 0), (9, 6), (10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9),
)

# Fig. 20 K sets: K(v) such that the minimality score of v is |F(C \ (K ∪ {v})) - F(C \ K)|.
_SINH = ((7, 3), (7, 9), (8, 6), (8, 10))
_IND = ((5, 5), (5, 9), (6, 9), (5, 8))
_DUP = ((0, 1), (0, 10), (3, 0))
_NEG = ((10, 7), (11, 10))


def _others(group: tuple[Head, ...], v: Head) -> frozenset[Head]:
    return frozenset(h for h in group if h != v)


def _nm_prefix(v: Head) -> frozenset[Head]:
    order = PAPER_NAME_MOVERS_BY_IMPORTANCE
    return frozenset(order[: order.index(v)])


PAPER_MINIMALITY_K: dict[Head, frozenset[Head]] = {
    **{v: _nm_prefix(v) for v in PAPER_NAME_MOVERS_BY_IMPORTANCE[:9]},
    (9, 0): _others(PAPER_NAME_MOVERS_BY_IMPORTANCE + _NEG, (9, 0)),
    (11, 9): _others(PAPER_NAME_MOVERS_BY_IMPORTANCE + _NEG, (11, 9)),
    (10, 7): frozenset({(11, 10)}),
    (11, 10): frozenset({(10, 7)}),
    **{v: _others(_SINH, v) for v in _SINH},
    (5, 5): _others(_IND, (5, 5)),
    (6, 9): _others(_IND, (6, 9)),
    (5, 8): frozenset(_NEG),
    (5, 9): frozenset(_NEG),
    **{v: _others(_DUP, v) for v in _DUP},
    (2, 2): frozenset({(4, 11)}),
    (4, 11): frozenset({(2, 2)}),
}
"""K(v) such that K ∪ {v} is the paper code's ``K[v]`` (``minimality.py`` stores K ∪ {v} and
removes v for F(C\\K)). For 9.0 and 11.9 the paper says "all name movers and negative heads" and
the paper code sets ``K[(9,0)] = K[(11,9)] = CIRCUIT["name mover"] + CIRCUIT["negative"]``: all 11
name movers (backups included) and both negatives, so K ∪ {v} is the same 13-head set for both
heads, K(9.0) contains 11.9 and K(11.9) contains 9.0. 5.8 and 5.9: K = the two negatives (paper
code). Name movers and backups: the prefix of the paper code's order before v."""

# Fig. 22: four greedy sets K found on the full circuit (verbatim).
PAPER_GREEDY_SETS: tuple[frozenset[Head], ...] = (
    frozenset({(9, 9), (9, 6), (5, 8), (5, 5), (2, 2)}),
    frozenset({(9, 9), (11, 10), (10, 7), (8, 6), (5, 8), (4, 11)}),
    frozenset({(10, 7), (5, 5), (2, 2), (4, 11)}),
    frozenset({(9, 9), (11, 10), (10, 7), (11, 2), (3, 0), (5, 8), (2, 2)}),
)


def minimality_k_sets(circuit: Circuit) -> dict[Head, frozenset[Head]]:
    """K(v) for every head of ``circuit``: the paper's Fig. 20 sets for the paper circuit, else the
    default rule of the paper code (the other heads of v's class; name movers by listed prefix)."""
    if circuit.name == "paper":
        return dict(PAPER_MINIMALITY_K)
    k_sets: dict[Head, frozenset[Head]] = {}
    for cls in circuit.class_names():
        members = tuple(tuple(h) for h in circuit.classes[cls])
        for index, head in enumerate(members):
            if cls == NAME_MOVER:
                k_sets[head] = frozenset(members[:index])
            else:
                k_sets[head] = frozenset(h for h in members if h != head)
    return k_sets


def circuit_from_mapping(name: str, classes: Mapping[str, list[Head]]) -> Circuit:
    """Build a :class:`Circuit` from a plain mapping (e.g. ``ioi.planted.CIRCUIT``)."""
    return Circuit(name=name, classes={k: tuple(tuple(h) for h in v) for k, v in classes.items()})


def circuit_for_model(spec: str) -> Circuit:
    """The circuit that belongs to a model: the planted one for ``planted-ioi``, else the paper's."""
    if str(spec) == "planted-ioi":
        from ioi import planted

        relevant = getattr(planted, "RELEVANT_POSITIONS", RELEVANT_POSITIONS)
        base = circuit_from_mapping("planted", planted.CIRCUIT)
        return dataclasses.replace(base, relevant_positions={**RELEVANT_POSITIONS, **relevant})
    return PAPER_CIRCUIT

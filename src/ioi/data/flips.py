"""Corruptions ("flips") of IOI prompts, position-aligned with their source.

Two syntaxes are accepted.

**Tuple flips** (the paper code's ``gen_flipped_prompts(prompts, names, flip)``), applied to token
positions from the source's ``word_idx`` (IO, S1, S2, and the answer at END+1), never to
whitespace-split words:

=================  ========================================================  ================
flip               effect on the name slots                                  labels after
=================  ========================================================  ================
("IO","RAND")      IO := R; the answer := R too if it is the IO name         IO = R
("S","RAND")       S1 := R and S2 := R (one name)                             S = R
("S1","RAND")      S1 := R                                                    unchanged
("S2","RAND")      S2 := R                                                    unchanged
("S2","IO")        S2 := IO                                                   IO, S swapped
("IO","S1")        swap the words at IO and S1 (ABB -> BAB)                   unchanged
("END","S")        the answer := S                                            unchanged
("IO","ANIMAL")    IO := random animal                                        IO = animal
("S","ANIMAL")     S1 := S2 := one random animal                              S = animal
("S1","ANIMAL")    S1 := random animal                                        unchanged
=================  ========================================================  ================

R is a fresh name: by default distinct from every name the prompt holds or has held
(``Prompt.seen_names``). ``paper_collisions=True`` reproduces the paper code's draws instead:
("IO"|"S2","RAND") avoid only the current IO and S labels; ("S"|"S1","RAND") draw from all names, so
A, B, C of the p_ABC chain sometimes coincide. Animals are drawn from the single-token ANIMALS.

**Name-pattern flips** (ARENA's DSL), e.g. ``"ABB->XYZ, BAB->XYZ"``: the part left of the comma
applies to ABBA prompts (IO before S1), the right part to BABA prompts. The three letters left of
``->`` name the words in the first three name slots (textual order: first and second name of
clause 1, S2); each letter on the right says what the slot becomes: a letter from the left keeps
that word, a new letter is a fresh random name. The answer word is left unchanged. New S = the
name of the last letter; new IO = the one name among the first two letters that occurs once in the
target, else the second. Fresh letters get distinct names that avoid the prompt's names
(``paper_collisions=True``: independent draws that avoid only the first three names, as ARENA).
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ioi.data.prompt import ANSWER_SLOT, Prompt

TUPLE_FLIPS: tuple[tuple[str, str], ...] = (
    ("IO", "RAND"), ("S", "RAND"), ("S1", "RAND"), ("S2", "RAND"), ("S2", "IO"), ("IO", "S1"),
    ("END", "S"), ("IO", "ANIMAL"), ("S", "ANIMAL"), ("S1", "ANIMAL"),
)  # fmt: skip

#: p_ABC as the paper code builds it (positions IO, S1, S2 end up holding A, C, B).
ABC_CHAIN: tuple[tuple[str, str], ...] = (("IO", "RAND"), ("S", "RAND"), ("S1", "RAND"))


@dataclass(frozen=True)
class TupleFlip:
    """A paper-code flip ``(target, source)``, e.g. ("S2", "IO")."""

    target: str
    source: str

    def describe(self) -> str:
        return f"({self.target!r}, {self.source!r})"


@dataclass(frozen=True)
class PatternFlip:
    """A name-pattern flip: (source letters, target letters) for ABBA and for BABA prompts."""

    abba: tuple[str, str]
    baba: tuple[str, str]

    def describe(self) -> str:
        return f"{self.abba[0]}->{self.abba[1]}, {self.baba[0]}->{self.baba[1]}"


Flip = TupleFlip | PatternFlip


def _supported() -> str:
    return (
        f"supported flips: tuples {[f'({a!r}, {b!r})' for a, b in TUPLE_FLIPS]} or a name "
        "pattern like 'ABB->XYZ, BAB->XYZ' (3 letters each side; left part for ABBA prompts)"
    )


def _parse_pattern_part(part: str, flip: str) -> tuple[str, str]:
    sides = [side.strip() for side in part.split("->")]
    if len(sides) != 2 or not all(len(s) == 3 and s.isalpha() and s.isupper() for s in sides):
        raise ValueError(
            f"Unknown flip {flip!r}: {part.strip()!r} is not 'XYZ->XYZ'; {_supported()}."
        )
    return sides[0], sides[1]


def parse_flip(flip) -> Flip:
    """Parse a tuple flip or a name-pattern string; ValueError for anything else."""
    if isinstance(flip, str):
        parts = flip.split(",")
        if len(parts) != 2:
            raise ValueError(f"Unknown flip {flip!r}; {_supported()}.")
        return PatternFlip(_parse_pattern_part(parts[0], flip), _parse_pattern_part(parts[1], flip))
    if isinstance(flip, (tuple, list)) and tuple(flip) in TUPLE_FLIPS:
        return TupleFlip(*flip)
    raise ValueError(f"Unknown flip {flip!r}; {_supported()}.")


def derive_seed(*parts) -> int:
    """A 63-bit seed from JSON-able parts via SHA-256 (process-stable; never ``hash()``)."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class SlotRoles:
    """Which name slot holds each position of ``word_idx`` for one prompt."""

    io: int
    s1: int
    s2: int
    answer: int = ANSWER_SLOT


class NameDrawer:
    """Random words for flips, from a seeded Generator and ordered word lists (no sets)."""

    def __init__(self, rng: np.random.Generator, names: Sequence[str], animals: Sequence[str]):
        self.rng, self.names, self.animals = rng, list(names), list(animals)

    def _candidates(self, exclude: Sequence[str]) -> list[str]:
        return [name for name in self.names if name not in exclude]

    def fresh(self, k: int, exclude: Sequence[str]) -> list[str]:
        """``k`` distinct names, none in ``exclude``."""
        pool = self._candidates(exclude)
        if len(pool) < k:
            raise ValueError(
                f"Cannot draw {k} fresh name(s) avoiding {list(exclude)}: only {len(pool)} left in "
                "the name list. Use a longer name list or paper_collisions=True."
            )
        return [pool[i] for i in self.rng.choice(len(pool), size=k, replace=False)]

    def independent(self, k: int, exclude: Sequence[str] = ()) -> list[str]:
        """``k`` independent uniform draws (may repeat) from the names not in ``exclude``."""
        pool = self._candidates(exclude)
        if not pool:
            raise ValueError(f"No name left to draw after excluding {list(exclude)}.")
        return [pool[i] for i in self.rng.integers(len(pool), size=k)]

    def animal(self) -> str:
        if not self.animals:
            raise ValueError("No single-token animal is available for an ANIMAL flip.")
        return self.animals[int(self.rng.integers(len(self.animals)))]


def _rand_name(flip: TupleFlip, prompt: Prompt, draw: NameDrawer, paper: bool) -> str:
    if not paper:
        return draw.fresh(1, prompt.seen_names)[0]
    if flip.target in ("IO", "S2"):
        return draw.independent(1, (prompt.io, prompt.s))[0]
    return draw.independent(1)[0]


def apply_tuple_flip(
    flip: TupleFlip, prompt: Prompt, roles: SlotRoles, draw: NameDrawer, paper: bool
) -> Prompt:
    """One prompt under a tuple flip (semantics in the module docstring)."""
    slots = list(prompt.names)
    new = ""
    if flip.source == "RAND":
        new = _rand_name(flip, prompt, draw, paper)
    elif flip.source == "ANIMAL":
        new = draw.animal()
    key = (flip.target, flip.source)
    if key in (("IO", "RAND"), ("IO", "ANIMAL")):
        if flip.source == "RAND" and slots[roles.answer] == prompt.io:
            slots[roles.answer] = new
        slots[roles.io] = new
        return prompt.with_slots(tuple(slots), io=new, new_words=(new,))
    if flip.target == "S" and flip.source in ("RAND", "ANIMAL"):
        slots[roles.s1] = slots[roles.s2] = new
        return prompt.with_slots(tuple(slots), s=new, new_words=(new,))
    if flip.target in ("S1", "S2") and flip.source in ("RAND", "ANIMAL"):
        slots[roles.s1 if flip.target == "S1" else roles.s2] = new
        return prompt.with_slots(tuple(slots), new_words=(new,))
    if key == ("S2", "IO"):
        slots[roles.s2] = prompt.io
        return prompt.with_slots(tuple(slots), io=prompt.s, s=prompt.io)
    if key == ("IO", "S1"):
        slots[roles.io], slots[roles.s1] = slots[roles.s1], slots[roles.io]
        return prompt.with_slots(tuple(slots))
    if key == ("END", "S"):
        slots[roles.answer] = prompt.s
        return prompt.with_slots(tuple(slots))
    raise ValueError(f"Unknown flip {flip.describe()}; {_supported()}.")  # pragma: no cover


def _check_pattern(source: str, words: Sequence[str], row: int, form: str) -> None:
    """Equal letters must hold equal words and different letters different words."""
    for i in range(3):
        for j in range(i + 1, 3):
            if (source[i] == source[j]) != (words[i] == words[j]):
                raise ValueError(
                    f"Flip source pattern {source!r} does not match prompt {row} ({form}), whose "
                    f"first three names are {list(words)}; the left part of the flip is for ABBA "
                    "prompts and the right part for BABA prompts."
                )


def _pattern_labels(target: str, letter_to_name: dict[str, str]) -> tuple[str, str]:
    """(IO, S) after a pattern flip: S = last letter; IO = the first-two letter occurring once."""
    once = [letter for letter in target[:2] if target.count(letter) == 1]
    io_letter = once[0] if len(once) == 1 else target[1]
    return letter_to_name[io_letter], letter_to_name[target[-1]]


def apply_pattern_flip(
    flip: PatternFlip, prompt: Prompt, form: str, row: int, draw: NameDrawer, paper: bool
) -> Prompt:
    """One prompt under a name-pattern flip (semantics in the module docstring)."""
    source, target = flip.abba if form == "ABBA" else flip.baba
    words = prompt.names[:3]
    _check_pattern(source, words, row, form)
    letter_to_name = {letter: word for letter, word in zip(source, words, strict=True)}
    fresh_letters = [
        letter
        for i, letter in enumerate(target)
        if letter not in source and letter not in target[:i]
    ]
    if paper:
        fresh = draw.independent(len(fresh_letters), words)
    else:
        fresh = draw.fresh(len(fresh_letters), prompt.seen_names)
    letter_to_name.update(zip(fresh_letters, fresh, strict=True))
    slots = (*(letter_to_name[letter] for letter in target), prompt.names[ANSWER_SLOT])
    io, s = _pattern_labels(target, letter_to_name)
    return prompt.with_slots(slots, io=io, s=s, new_words=tuple(fresh))


def apply_flip(
    flip: Flip,
    prompts: Sequence[Prompt],
    roles: Sequence[SlotRoles],
    forms: Sequence[str],
    draw: NameDrawer,
    paper_collisions: bool,
) -> list[Prompt]:
    """Apply a parsed flip to every prompt, in order (one shared Generator)."""
    if isinstance(flip, TupleFlip):
        return [
            apply_tuple_flip(flip, prompt, role, draw, paper_collisions)
            for prompt, role in zip(prompts, roles, strict=True)
        ]
    return [
        apply_pattern_flip(flip, prompt, form, row, draw, paper_collisions)
        for row, (prompt, form) in enumerate(zip(prompts, forms, strict=True))
    ]

"""Tests for ioi.data: word lists, generation, positions, corruptions, validation, persistence.

All tests use the real GPT-2 tokenizer (offline). Token ids used below: " to" = 284,
pad = BOS = EOS = 50256.
"""

import itertools
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ioi.data import (
    ABBA_TEMPLATES,
    ANIMALS,
    BABA_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATE_IDS,
    IOIDataset,
    check_aligned,
    count_distinct_prompts,
    make_abc,
    resolve_templates,
)

TO = 284
PAD = 50256


# --------------------------------------------------------------------------------- helpers
def tok1(tokenizer, word: str) -> int:
    ids = tokenizer.encode(" " + word)
    assert len(ids) == 1, (word, ids)
    return ids[0]


def at(ds: IOIDataset, key: str) -> torch.Tensor:
    """Token at word_idx[key] for every prompt."""
    return ds.toks[torch.arange(len(ds)), ds.word_idx[key]]


def fixed_pair(tokenizer, io="Mary", s="John", template=0, **kwargs) -> IOIDataset:
    """Two hand-made prompts: ABBA-k then BABA-k with the same names, place and object."""
    prompts = [
        {"template_id": f"{form}-{template}", "io": io, "s": s, "place": "store", "object": "drink"}
        for form in ("ABBA", "BABA")
    ]
    return IOIDataset(prompts=prompts, tokenizer=tokenizer, **kwargs)


def swap_first_clause(template: str) -> str:
    """The paper code's ABBA construction: swap the first [B] and the first [A]."""
    i, j = template.index("[B]"), template.index("[A]")
    chars = list(template)
    chars[i + 1], chars[j + 1] = "A", "B"
    return "".join(chars)


PROMPT_TYPES = [
    ("mixed", False), ("BABA", False), ("ABBA", False),
    ("mixed", True), ("BABA", True), ("ABBA", True),
]  # fmt: skip


@pytest.fixture(scope="module")
def datasets(tokenizer):
    """N=1000 datasets for every (prompt_type, all_templates, prepend_bos)."""
    out = {}
    for (prompt_type, all_t), bos in itertools.product(PROMPT_TYPES, (False, True)):
        out[prompt_type, all_t, bos] = IOIDataset(
            prompt_type, 1000, seed=7, all_templates=all_t, prepend_bos=bos, tokenizer=tokenizer
        )
    return out


@pytest.fixture(scope="module")
def mixed(tokenizer):
    return IOIDataset("mixed", 300, seed=3, tokenizer=tokenizer)


# ------------------------------------------------------------------------------ word lists
def test_word_lists_match_paper_code(tokenizer):
    assert len(NAMES) == 99 and NAMES[:3] == ("Michael", "Christopher", "Jessica")
    assert NAMES[-3:] == ("Allison", "Bradley", "Samuel") and len(set(NAMES)) == 99
    assert PLACES == (
        "store",
        "garden",
        "restaurant",
        "school",
        "hospital",
        "office",
        "house",
        "station",
    )
    assert OBJECTS == (
        "ring",
        "kiss",
        "bone",
        "basketball",
        "computer",
        "necklace",
        "drink",
        "snack",
    )
    assert len(ANIMALS) == 18
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15
    assert BABA_TEMPLATES[0] == "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    assert ABBA_TEMPLATES[0] == "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    assert [swap_first_clause(t) for t in BABA_TEMPLATES] == list(ABBA_TEMPLATES)
    for word in NAMES + PLACES + OBJECTS:
        tok1(tokenizer, word)


def test_template_token_counts_match_study_notes(tokenizer):
    """Paper-code template lengths with single-token fillers (incl. answer), peers.md §1.4."""
    expected = [16, 20, 19, 21, 16, 15, 18, 19, 16, 16, 18, 17, 15, 16, 16]
    ds = IOIDataset(
        prompts=[
            {"template_id": t, "io": "Mary", "s": "John", "place": "store", "object": "drink"}
            for t in TEMPLATE_IDS
        ],
        tokenizer=tokenizer,
    )
    assert ds.prompt_lengths.tolist() == expected * 2


# ------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("prompt_type,all_templates", PROMPT_TYPES)
def test_positions_hold_expected_tokens(datasets, prompt_type, all_templates, bos):
    ds = datasets[prompt_type, all_templates, bos]
    assert len(ds) == ds.N == 1000 and ds.toks.dtype == torch.long
    io, s = ds.io_token_ids, ds.s_token_ids
    assert (io != s).all()
    assert torch.equal(at(ds, "IO"), io)
    assert torch.equal(at(ds, "S1"), s) and torch.equal(at(ds, "S2"), s)
    assert (at(ds, "END") == TO).all()
    rows = torch.arange(len(ds))
    assert torch.equal(ds.toks[rows, ds.word_idx["END"] + 1], io)
    assert torch.equal(ds.word_idx["S1+1"], ds.word_idx["S1"] + 1)
    assert torch.equal(ds.word_idx["END"] + 2, ds.prompt_lengths)
    assert (ds.word_idx["S1"] < ds.word_idx["S2"]).all() and (
        ds.word_idx["S2"] < ds.word_idx["END"]
    ).all()
    assert ds.max_len == int(ds.prompt_lengths.max()) == ds.toks.shape[1]
    pad = torch.arange(ds.max_len)[None, :] >= ds.prompt_lengths[:, None]
    assert (ds.toks[pad] == PAD).all()
    if bos:
        assert (ds.toks[:, 0] == PAD).all()
        plain = IOIDataset(
            prompt_type, 1000, seed=7, all_templates=all_templates, tokenizer=ds.tokenizer
        )
        assert plain.sentences == ds.sentences
        for key in ("IO", "S1", "S1+1", "S2", "END"):
            assert torch.equal(ds.word_idx[key], plain.word_idx[key] + 1)
    # forms: token-level label agrees with the template the prompt was drawn from
    assert ds.template_forms == [t.split("-")[0] for t in ds.template_ids]


def test_word_idx_aliases_and_prompt_text(mixed, tokenizer):
    for alias, key in (("S", "S1"), ("S+1", "S1+1"), ("end", "END")):
        assert mixed.word_idx[alias] is mixed.word_idx[key] and alias in mixed.word_idx
    assert set(mixed.word_idx) == {"IO", "S1", "S1+1", "S2", "END"}
    for i in range(20):
        ids = tokenizer.encode(mixed.prompts_without_answer[i])
        assert ids == mixed.toks[i, : mixed.word_idx["END"][i] + 1].tolist()
        assert mixed.sentences[i] == mixed.prompts_without_answer[i] + " " + mixed.io_names[i]
    assert torch.equal(mixed.io_tokenIDs, mixed.io_token_ids)


def test_template_subsets(datasets):
    for (prompt_type, all_templates, _), ds in datasets.items():
        used = set(ds.template_ids)
        forms = {"mixed": {"ABBA", "BABA"}}.get(prompt_type, {prompt_type})
        # The paper code: only "mixed" halves nb_templates=15; "BABA"/"ABBA" take all 15.
        k_max = 14 if all_templates or prompt_type != "mixed" else 6
        assert used == {f"{f}-{k}" for f in forms for k in range(k_max + 1)}, (
            prompt_type,
            all_templates,
        )


def test_named_prompt_types_use_the_paper_codes_template_sets():
    """The paper code's IOIDataset(prompt_type, nb_templates=15): "BABA"/"ABBA" take
    TEMPLATES[:15] (all 15), only "mixed" takes BABA[:7] + ABBA[:7]."""
    for form in ("BABA", "ABBA"):
        for all_t in (False, True):
            ids = [t.id for t in resolve_templates(form, all_templates=all_t)]
            assert ids == [f"{form}-{k}" for k in range(15)], (form, all_t)
    mixed_ids = [t.id for t in resolve_templates("mixed")]
    assert mixed_ids == [f"BABA-{k}" for k in range(7)] + [f"ABBA-{k}" for k in range(7)]
    assert len(resolve_templates("mixed", all_templates=True)) == 30


def test_groups_partition_by_template(mixed):
    assert mixed.group_ids == sorted(mixed.group_ids, key=TEMPLATE_IDS.index)
    covered = torch.cat(mixed.groups).sort().values
    assert torch.equal(covered, torch.arange(len(mixed)))
    for gid, idx in zip(mixed.group_ids, mixed.groups, strict=True):
        assert {mixed.template_ids[i] for i in idx.tolist()} == {gid}


@pytest.mark.parametrize(
    "a,b", [("Daniel", "Danielle"), ("Eric", "Erica"), ("Sara", "Sarah"), ("Jose", "Joseph")]
)
def test_forms_correct_for_substring_names(tokenizer, a, b):
    for io, s in ((a, b), (b, a)):
        ds = fixed_pair(tokenizer, io=io, s=s)
        assert ds.template_forms == ["ABBA", "BABA"]
        assert torch.equal(at(ds, "IO"), ds.io_token_ids) and torch.equal(
            at(ds, "S2"), ds.s_token_ids
        )
    # the paper code's substring rule (ABBA iff text.index(IO) < text.index(S)) mislabels
    # "Then, Danielle and Daniel ..." with IO = Danielle: both searches hit position 6
    ds = fixed_pair(tokenizer, io=b, s=a)
    paper = ["ABBA" if t.index(b) < t.index(a) else "BABA" for t in ds.sentences]
    assert paper != ds.template_forms


# ------------------------------------------------------------------------- p_ABC and flips
def test_abc_three_distinct_fresh_names(datasets):
    ds = datasets["mixed", False, False]
    abc = ds.abc_dataset()
    a, c, b = at(abc, "IO"), at(abc, "S1"), at(abc, "S2")
    assert ((a != b) & (a != c) & (b != c)).all()
    for tok in (a, b, c):
        assert ((tok != ds.io_token_ids) & (tok != ds.s_token_ids)).all()
    assert torch.equal(abc.io_token_ids, a) and torch.equal(abc.s_token_ids, b)
    assert torch.equal(abc.toks[torch.arange(len(ds)), abc.word_idx["END"] + 1], a)  # answer := A
    for key in ds.word_idx:
        assert torch.equal(abc.word_idx[key], ds.word_idx[key])
    assert torch.equal(abc.prompt_lengths, ds.prompt_lengths)
    same = ds.toks == abc.toks
    same[torch.arange(len(ds))[:, None], ds.name_slot_positions] = True
    assert same.all()  # only name tokens changed
    chain = (
        ds.gen_flipped_prompts(("IO", "RAND"))
        .gen_flipped_prompts(("S", "RAND"))
        .gen_flipped_prompts(("S1", "RAND"))
    )
    assert chain.content_hash() == abc.content_hash() == make_abc(ds).content_hash()
    assert abc.template_forms == ds.template_forms and abc.template_ids == ds.template_ids


def _first_three(ds: IOIDataset, i: int) -> list[str]:
    return list(ds.prompts[i].names[:3])


@pytest.mark.parametrize(
    "flip,abba,baba,labels",
    [
        # (flip, ABBA sentence, BABA sentence, [(io, s) for ABBA, BABA]); source: IO=Mary, S=John
        (
            ("S2", "IO"),
            "Mary and John|Mary|Mary",
            "John and Mary|Mary|Mary",
            [("John", "Mary")] * 2,
        ),
        (
            ("IO", "S1"),
            "John and Mary|John|Mary",
            "Mary and John|John|Mary",
            [("Mary", "John")] * 2,
        ),
        (
            ("END", "S"),
            "Mary and John|John|John",
            "John and Mary|John|John",
            [("Mary", "John")] * 2,
        ),
    ],
)
def test_tuple_flips_deterministic(tokenizer, flip, abba, baba, labels):
    ds = fixed_pair(tokenizer)
    out = ds.gen_flipped_prompts(flip)
    for i, pattern in enumerate((abba, baba)):
        clause, s2, answer = pattern.split("|")
        assert (
            out.sentences[i] == f"Then, {clause} went to the store. {s2} gave a drink to {answer}"
        )
        assert (out.io_names[i], out.s_names[i]) == labels[i]
    assert out.template_forms == ds.template_forms
    assert out.flip_history[-1]["flip"] == repr(flip).replace('"', "'")


def test_tuple_flips_random(tokenizer):
    ds = fixed_pair(tokenizer)
    orig = {"Mary", "John"}

    def words(out, i):  # (clause-1 first, clause-1 second, S2, answer)
        return list(out.prompts[i].names)

    out = ds.gen_flipped_prompts(("IO", "RAND"))  # IO and answer -> X
    for i, (io_slot, s_slot) in enumerate(((0, 1), (1, 0))):
        x = out.io_names[i]
        assert x not in orig and out.s_names[i] == "John"
        w = words(out, i)
        assert w[io_slot] == w[3] == x and w[s_slot] == w[2] == "John"
    out = ds.gen_flipped_prompts(("S", "RAND"))  # S1 and S2 -> Y
    for i, (io_slot, s_slot) in enumerate(((0, 1), (1, 0))):
        y = out.s_names[i]
        assert y not in orig and out.io_names[i] == "Mary"
        w = words(out, i)
        assert w[s_slot] == w[2] == y and w[io_slot] == w[3] == "Mary"
    for flip, changed in ((("S1", "RAND"), "S1"), (("S2", "RAND"), "S2")):
        out = ds.gen_flipped_prompts(flip)
        for i, s1_slot in enumerate((1, 0)):
            w = words(out, i)
            slot = s1_slot if changed == "S1" else 2
            assert w[slot] not in orig and (out.io_names[i], out.s_names[i]) == ("Mary", "John")
            assert [x for k, x in enumerate(w) if k != slot] == [
                x for k, x in enumerate(words(ds, i)) if k != slot
            ]
    single_animals = [a for a in ANIMALS if len(tokenizer.encode(" " + a)) == 1]
    assert len(single_animals) == 12  # hippo, giraffe, husky, panther, beaver, ferret are skipped
    out = ds.gen_flipped_prompts(("IO", "ANIMAL"))
    assert out.prompts[0].names[0] in single_animals and out.prompts[0].names[3] == "Mary"
    assert out.io_names[0] == out.prompts[0].names[0] and torch.equal(
        at(out, "IO"), out.io_token_ids
    )
    out = ds.gen_flipped_prompts(("S", "ANIMAL"))
    assert out.prompts[1].names[0] == out.prompts[1].names[2] == out.s_names[1] in single_animals
    out = ds.gen_flipped_prompts(("S1", "ANIMAL"))
    assert out.prompts[0].names[1] in single_animals and out.prompts[0].names[2] == "John"


@pytest.mark.parametrize(
    "flip,abba,baba",
    [
        # expected first three names, IO label, S label; letters C/D/X/Y/Z = fresh names
        (
            "ABB->BAB, BAB->ABB",
            ("John Mary John", "Mary", "John"),
            ("Mary John John", "Mary", "John"),
        ),
        (
            "ABB->ABA, BAB->BAA",
            ("Mary John Mary", "John", "Mary"),
            ("John Mary Mary", "John", "Mary"),
        ),
        (
            "ABB->BAA, BAB->ABA",
            ("John Mary Mary", "John", "Mary"),
            ("Mary John Mary", "John", "Mary"),
        ),
        ("ABB->CDD, BAB->DCD", ("C D D", "C", "D"), ("D C D", "C", "D")),
        ("ABB->DCD, BAB->CDD", ("D C D", "C", "D"), ("C D D", "C", "D")),
        ("ABB->XYZ, BAB->XYZ", ("X Y Z", "Y", "Z"), ("X Y Z", "Y", "Z")),
    ],
)
def test_pattern_flips(tokenizer, flip, abba, baba):
    ds = fixed_pair(tokenizer)
    out = ds.gen_flipped_prompts(flip)
    for i, (names, io, s) in enumerate((abba, baba)):
        got = _first_three(out, i)
        fresh = {}
        for letter, word in zip(names.split(), got, strict=True):
            if len(letter) == 1:
                assert fresh.setdefault(letter, word) == word  # same letter -> same name
                assert word not in {"Mary", "John"}
            else:
                assert word == letter
        assert len(set(fresh.values())) == len(fresh)  # fresh letters get distinct names
        assert out.prompts[i].names[3] == "Mary"  # the answer word is left unchanged
        assert out.io_names[i] == fresh.get(io, io) and out.s_names[i] == fresh.get(s, s)
    assert torch.equal(out.word_idx["IO"], ds.word_idx["IO"])


def test_pattern_flip_must_fit_prompt(tokenizer):
    with pytest.raises(ValueError, match="does not match prompt 0 .*ABBA"):
        fixed_pair(tokenizer).gen_flipped_prompts("BAB->XYZ, ABB->XYZ")


@pytest.mark.parametrize(
    "flip",
    [("IO", "RAND"), ("S", "RAND"), ("S1", "RAND"), ("S2", "RAND"), ("S2", "IO"), ("IO", "S1"),
     ("END", "S"), ("IO", "ANIMAL"), ("S", "ANIMAL"), ("S1", "ANIMAL"),
     "ABB->XYZ, BAB->XYZ", "ABB->BAB, BAB->ABB", "ABB->CDD, BAB->DCD", "ABB->ABA, BAB->BAA"],
)  # fmt: skip
def test_flips_are_position_aligned(mixed, flip):
    out = mixed.gen_flipped_prompts(flip)
    check_aligned(mixed, out)
    assert torch.equal(out.prompt_lengths, mixed.prompt_lengths)
    assert torch.equal(out.name_slot_positions, mixed.name_slot_positions)
    for key in mixed.word_idx:
        assert torch.equal(out.word_idx[key], mixed.word_idx[key])
    assert len(out.flip_history) == 1 and out.seed == mixed.seed


def test_corrupted_prompts_need_word_idx(tokenizer, mixed):
    abc = mixed.abc_dataset()
    with pytest.raises(ValueError, match="pass word_idx explicitly"):
        IOIDataset(prompts=abc.prompts, tokenizer=tokenizer)
    rebuilt = IOIDataset(prompts=abc.prompts, word_idx=abc.word_idx, tokenizer=tokenizer)
    assert torch.equal(rebuilt.toks, abc.toks) and rebuilt.io_names == abc.io_names


def test_alignment_violation_raises(tokenizer):
    a = IOIDataset("mixed", 50, seed=0, tokenizer=tokenizer)
    b = IOIDataset("mixed", 50, seed=1, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="not position-aligned|changed non-name tokens"):
        check_aligned(a, b)


def test_paper_collisions_reproduced(tokenizer):
    ds = IOIDataset("mixed", 5000, seed=11, tokenizer=tokenizer)

    def collisions(abc):
        a, c, b = at(abc, "IO"), at(abc, "S1"), at(abc, "S2")
        clash = (a == b) | (a == c) | (b == c)
        for tok in (b, c):
            clash |= (tok == ds.io_token_ids) | (tok == ds.s_token_ids)
        return int(clash.sum())

    assert collisions(ds.abc_dataset()) == 0
    paper = ds.abc_dataset(paper_collisions=True)
    assert 50 < collisions(paper) < 500  # about 4%: B, C drawn from all 99 names
    # distinct_names=False makes paper-style draws the dataset's default
    lax = IOIDataset("mixed", 50, seed=11, tokenizer=tokenizer, distinct_names=False)
    assert all(h["paper_collisions"] for h in lax.abc_dataset().flip_history)
    assert lax.abc_dataset() == lax.abc_dataset(paper_collisions=True)
    xyz = ds.gen_flipped_prompts("ABB->XYZ, BAB->XYZ", paper_collisions=True)
    names = np.array([p.names[:3] for p in xyz.prompts])
    dup = (names[:, 0] == names[:, 1]) | (names[:, 0] == names[:, 2]) | (names[:, 1] == names[:, 2])
    assert 20 < dup.sum() < 400  # ARENA's independent draws: ~3%


def test_flip_seed_explicit_and_derived(mixed):
    a = mixed.gen_flipped_prompts(("IO", "RAND"))
    assert a == mixed.gen_flipped_prompts(("IO", "RAND"))
    assert a != mixed.gen_flipped_prompts(("IO", "RAND"), seed=123)
    assert mixed.gen_flipped_prompts(("IO", "RAND"), seed=123) == mixed.gen_flipped_prompts(
        ("IO", "RAND"), seed=123
    )
    assert mixed.abc_dataset(seed=5) == mixed.abc_dataset(seed=5) != mixed.abc_dataset()


# ------------------------------------------------------------------------------ validation
def test_multi_token_name_rejected(tokenizer):
    assert len(tokenizer.encode(" Bartholomew")) == 3
    with pytest.raises(
        ValueError, match=r"Name 'Bartholomew' is not a single GPT-2 token.*3 tokens"
    ):
        IOIDataset("mixed", 10, names=["Mary", "John", "Bartholomew"], tokenizer=tokenizer)


def test_multi_token_place_and_object_rejected(tokenizer):
    assert len(tokenizer.encode(" planetarium")) == 2
    with pytest.raises(ValueError, match=r"Place 'planetarium' .*2 tokens"):
        IOIDataset("mixed", 10, places=["store", "planetarium"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Object 'trampoline' .*3 tokens"):
        IOIDataset("mixed", 10, objects=["trampoline"], tokenizer=tokenizer)


def test_n_too_large_for_word_lists(tokenizer):
    small = dict(
        names=["Mary", "John"], places=["store"], objects=["drink"], prompt_type=["ABBA-0"]
    )
    with pytest.raises(ValueError, match=r"N=3 prompts requested, but only 2 distinct prompts"):
        IOIDataset(N=3, tokenizer=tokenizer, **small)
    ds = IOIDataset(N=2, unique=True, tokenizer=tokenizer, **small)
    assert sorted(ds.sentences) == [
        "Then, John and Mary went to the store. Mary gave a drink to John",
        "Then, Mary and John went to the store. John gave a drink to Mary",
    ]


def test_distinct_prompt_count_is_exact(tokenizer):
    names, places, objects = ["Mary", "John", "Paul"], ["store", "garden"], ["ring", "kiss"]
    templates = resolve_templates("mixed", all_templates=True)
    texts = set()
    for t in templates:
        for io, s in itertools.permutations(names, 2):
            for p, o in itertools.product(places, objects):
                texts.add(
                    t.text.replace("[A]", io)
                    .replace("[B]", s)
                    .replace("[PLACE]", p)
                    .replace("[OBJECT]", o)
                )
    assert count_distinct_prompts(templates, 3, 2, 2) == len(texts) == 6 * (26 * 4 + 4 * 1)
    ds = IOIDataset(
        "mixed",
        len(texts),
        all_templates=True,
        unique=True,
        names=names,
        places=places,
        objects=objects,
        tokenizer=tokenizer,
    )
    assert set(ds.sentences) == texts
    with pytest.raises(ValueError, match="distinct prompts"):
        IOIDataset(
            "mixed",
            len(texts) + 1,
            all_templates=True,
            names=names,
            places=places,
            objects=objects,
            tokenizer=tokenizer,
        )


def test_unknown_prompt_type_template_and_flip(tokenizer, mixed):
    with pytest.raises(ValueError, match=r"Unknown prompt_type 'ABC'"):
        IOIDataset("ABC", 10, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Unknown template 'BABA-15'"):
        IOIDataset(["BABA-15"], 10, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Unknown template .*read 'ABA'"):
        IOIDataset(["Then, [A] and [B] left to [A]"], 10, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Unknown flip \('IO', 'XYZ'\)"):
        mixed.gen_flipped_prompts(("IO", "XYZ"))
    with pytest.raises(ValueError, match=r"Unknown flip 'ABB->XY, BAB->XYZ'"):
        mixed.gen_flipped_prompts("ABB->XY, BAB->XYZ")


def test_custom_template_list(tokenizer):
    custom = "Later, [B] and [A] met at the [PLACE]. [B] handed a [OBJECT] to [A]"
    ds = IOIDataset([custom, "ABBA-3"], 200, seed=2, tokenizer=tokenizer)
    assert set(ds.template_ids) == {"custom-0", "ABBA-3"}
    assert ds.template_forms == ["BABA" if t == "custom-0" else "ABBA" for t in ds.template_ids]
    assert torch.equal(at(ds, "IO"), ds.io_token_ids) and torch.equal(at(ds, "S2"), ds.s_token_ids)


# --------------------------------------------------------------------- determinism, slicing
def test_seeded_and_isolated_from_global_rng(tokenizer):
    random.seed(0)
    np.random.seed(0)
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    a = IOIDataset("mixed", 200, seed=4, tokenizer=tokenizer)
    a.abc_dataset()
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state)
    assert a.content_hash() == IOIDataset("mixed", 200, seed=4, tokenizer=tokenizer).content_hash()
    assert a.content_hash() != IOIDataset("mixed", 200, seed=5, tokenizer=tokenizer).content_hash()


HASH_SCRIPT = textwrap.dedent(
    """
    from ioi.data import IOIDataset
    ds = IOIDataset("mixed", 300, seed=9)
    u = IOIDataset("ABBA", 100, seed=9, unique=True, symmetric=True, prepend_bos=True)
    print(ds.content_hash(), ds.abc_dataset().content_hash(),
          ds.gen_flipped_prompts("ABB->XYZ, BAB->XYZ").content_hash(),
          ds.abc_dataset(paper_collisions=True).content_hash(), u.content_hash())
    """
)


def test_identical_across_processes_with_different_hash_seeds(tokenizer):
    procs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", HASH_SCRIPT],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.split())
    ds = IOIDataset("mixed", 300, seed=9, tokenizer=tokenizer)
    assert outputs[0] == outputs[1]
    assert outputs[0][:2] == [ds.content_hash(), ds.abc_dataset().content_hash()]


def test_slicing_and_device(mixed):
    sub = mixed[10:20]
    assert len(sub) == 10 and sub.sentences == mixed.sentences[10:20]
    assert torch.equal(sub.toks, mixed.toks[10:20, : sub.max_len])
    assert (mixed.toks[10:20, sub.max_len :] == PAD).all()
    for key in mixed.word_idx:
        assert torch.equal(sub.word_idx[key], mixed.word_idx[key][10:20])
    picked = mixed[torch.tensor([5, 2, 7])]
    assert picked.io_names == [mixed.io_names[i] for i in (5, 2, 7)]
    assert mixed[[5, 2, 7]] == picked and len(mixed[-1]) == 1
    assert mixed[mixed.groups[0]].group_ids == [mixed.group_ids[0]]
    moved = mixed.to("cpu")
    assert moved == mixed and moved.toks.device.type == "cpu"
    with pytest.raises(IndexError):
        mixed[len(mixed)]
    text = repr(mixed)
    assert "N=300" in text and "prompt_type='mixed'" in text and "max_len=" in text


def test_symmetric_twins(tokenizer):
    ds = IOIDataset("mixed", 9, seed=1, symmetric=True, tokenizer=tokenizer)
    assert len(ds) == 9
    for i in range(0, 8, 2):
        a, b = ds.prompts[i], ds.prompts[i + 1]
        assert (a.io, a.s, a.template_id, a.place, a.object) == (
            b.s,
            b.io,
            b.template_id,
            b.place,
            b.object,
        )


# ----------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_save_load_round_trip(tmp_path, tokenizer, suffix):
    ds = IOIDataset("mixed", 120, seed=6, prepend_bos=True, all_templates=True, tokenizer=tokenizer)
    for item in (ds, ds.abc_dataset(), ds.gen_flipped_prompts(("S2", "IO"))):
        path = item.save(tmp_path / f"d{len(item.flip_history)}{suffix}")
        back = IOIDataset.load(path, tokenizer=tokenizer)
        assert back.content_hash() == item.content_hash()
        assert torch.equal(back.toks, item.toks)
        for key in item.word_idx:
            assert torch.equal(back.word_idx[key], item.word_idx[key])
        assert back.flip_history == item.flip_history and back.settings == item.settings
        meta = item.metadata()
        assert (
            meta["seed"] == 6
            and meta["N"] == 120
            and meta["prepend_bos"]
            and meta["package_version"]
        )
    # a loaded dataset flips exactly like the original
    loaded = IOIDataset.load(ds.save(tmp_path / f"clean{suffix}"), tokenizer=tokenizer)
    assert loaded.abc_dataset() == ds.abc_dataset()
    records = ds.to_records()
    assert records[0]["sentence"] == ds.sentences[0] and records[0]["pos_END"] == int(
        ds.word_idx["END"][0]
    )

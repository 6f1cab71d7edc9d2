"""Tokenisation and token positions (``word_idx``) of IOI prompts.

Position definitions (0-based token indices into ``toks``; with ``prepend_bos=True`` every
position is shifted by 1 because token 0 is BOS = 50256):

* ``IO``   - the IO name's token in the first clause.
* ``S1``   - the first S token (first clause).
* ``S1+1`` - ``S1 + 1``, the token after S1 (" and" in every paper template).
* ``S2``   - the last S token before END (the second mention of the subject).
* ``END``  - the token just before the answer (" to" in every paper template); logits are read
  here. The answer token (" " + IO) sits at ``END + 1``, the last token of the prompt.

For a clean prompt these are computed from the token ids (first/last occurrence of the IO/S
token, as the paper code does, but on tokens rather than strings) and cross-checked against the
template's slot structure. Corrupted prompts reuse their clean source's positions.
Aliases accepted when indexing: ``S`` -> ``S1``, ``S+1`` -> ``S1+1``, ``end`` -> ``END``.
"""

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Int

from ioi.data.prompt import ANSWER_SLOT, Prompt

WORD_IDX_KEYS = ("IO", "S1", "S1+1", "S2", "END")
WORD_IDX_ALIASES = {"S": "S1", "S+1": "S1+1", "end": "END"}


class WordIdx(dict):
    """``{position name: LongTensor[N]}`` that also answers to the paper's key aliases."""

    def __getitem__(self, key):
        return super().__getitem__(WORD_IDX_ALIASES.get(key, key))

    def __contains__(self, key) -> bool:
        return super().__contains__(WORD_IDX_ALIASES.get(key, key))

    def get(self, key, default=None):
        return super().get(WORD_IDX_ALIASES.get(key, key), default)


def word_token_ids(tokenizer, word: str) -> list[int]:
    """Token ids of ``" " + word`` (a word as it appears mid-sentence)."""
    return tokenizer.encode(" " + word, add_special_tokens=False)


def single_token_id(tokenizer, word: str, kind: str = "word") -> int:
    """The one token id of ``" " + word``; ValueError naming the word if it is not one token."""
    ids = word_token_ids(tokenizer, word)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"{kind.capitalize()} {word!r} is not a single GPT-2 token with a leading space: "
            f"{' ' + word!r} -> {len(ids)} tokens {pieces}. Every name, place and object must be "
            "one token so that prompts and their corruptions stay position-aligned; remove it from "
            "the word list."
        )
    return ids[0]


def validate_word_list(
    tokenizer, words: Sequence[str], kind: str, minimum: int = 1
) -> dict[str, int]:
    """Check a name/place/object list; return ``{word: token id}``.

    Raises ValueError for too few words, duplicates, non-strings, or multi-token words.
    """
    words = list(words)
    if len(words) < minimum:
        raise ValueError(f"Need at least {minimum} {kind}(s), got {len(words)}: {words!r}")
    for word in words:
        if not isinstance(word, str) or not word or word != word.strip() or "[" in word:
            raise ValueError(f"Invalid {kind} {word!r}: expected a bare word without spaces.")
    duplicates = sorted({w for w in words if words.count(w) > 1})
    if duplicates:
        raise ValueError(f"The {kind} list repeats {duplicates}; give each word once.")
    return {word: single_token_id(tokenizer, word, kind) for word in words}


def require_fast_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "IOIDataset needs a fast (Rust) tokenizer for character offsets; use "
            "ioi.tokenizer.get_gpt2_tokenizer()."
        )


def _slot_token_index(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> int | None:
    """Index of the token covering exactly one slot word (with or without its leading space)."""
    start, end = span
    for index, (tok_start, tok_end) in enumerate(offsets):
        if tok_end == end and tok_start in (start - 1, start):
            return index
    return None


def _encode_with_offsets(
    tokenizer, texts: list[str]
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(token ids, character offsets) per text, via the Rust backend when available (faster)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [
            (list(e.ids), list(e.offsets))
            for e in backend.encode_batch(texts, add_special_tokens=False)
        ]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))


def tokenize_prompts(
    tokenizer, prompts: Sequence[Prompt], prepend_bos: bool
) -> tuple[list[list[int]], np.ndarray]:
    """Tokenise prompts; return per-prompt token ids and the ``[N, 4]`` token index of each slot.

    Each slot word must be exactly one token in context, equal to the token of ``" " + word``
    (raises ValueError naming the prompt and word otherwise). Indices include the BOS shift.
    """
    require_fast_tokenizer(tokenizer)
    encodings = _encode_with_offsets(tokenizer, [p.text for p in prompts])
    shift = int(prepend_bos)
    token_of: dict[str, int] = {}
    ids_out: list[list[int]] = []
    slots = np.zeros((len(prompts), len(prompts[0].names) if prompts else 4), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids, offsets = encodings[row]
        for slot, span in enumerate(prompt.rendered.slot_spans):
            index = _slot_token_index(offsets, span)
            word = prompt.names[slot]
            if word not in token_of:
                token_of[word] = single_token_id(tokenizer, word, "name slot word")
            if index is None or ids[index] != token_of[word]:
                raise ValueError(
                    f"Prompt {row} ({prompt.text!r}): the word {word!r} in name slot {slot} is not "
                    "one ' word' token in context."
                )
            slots[row, slot] = index + shift
        ids_out.append([tokenizer.bos_token_id] * shift + ids)
    return ids_out, slots


def pad_token_ids(
    ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> Int[torch.Tensor, "batch pos"]:
    """Right-pad token id lists with ``pad_id`` into a LongTensor ``[N, max_len]``."""
    max_len = max(len(row) for row in ids)
    toks = np.full((len(ids), max_len), pad_id, dtype=np.int64)
    for row, row_ids in enumerate(ids):
        toks[row, : len(row_ids)] = row_ids
    return torch.from_numpy(toks).to(device)


def _first(ids: Sequence[int], token: int, stop: int) -> int:
    return ids.index(token, 0, stop)


def _last(ids: Sequence[int], token: int, stop: int) -> int:
    return max(i for i in range(stop) if ids[i] == token)


def clean_word_idx(
    ids: Sequence[Sequence[int]],
    slots: np.ndarray,
    io_ids: Sequence[int],
    s_ids: Sequence[int],
) -> dict[str, np.ndarray]:
    """Positions of a clean IOI prompt, found from token ids and checked against the slots.

    END = answer slot - 1; IO = first IO token before the answer; S1 = first S token; S2 = last
    S token before END. Raises ValueError if the labels are not where a clean IOI prompt has them
    (e.g. a corrupted prompt given without ``word_idx``).
    """
    n = len(ids)
    out = {key: np.zeros(n, dtype=np.int64) for key in WORD_IDX_KEYS}
    for row in range(n):
        end = int(slots[row, ANSWER_SLOT]) - 1
        try:
            io_pos = _first(ids[row], io_ids[row], end + 1)
            s1 = _first(ids[row], s_ids[row], end + 1)
            s2 = _last(ids[row], s_ids[row], end)
        except ValueError:
            io_pos = s1 = s2 = -1
        first_clause = {int(slots[row, 0]), int(slots[row, 1])}
        if {io_pos, s1} != first_clause or s2 != int(slots[row, 2]):
            raise ValueError(
                f"Prompt {row}: its IO/S labels are not at the IO/S1/S2 name slots of a clean IOI "
                "prompt; pass word_idx explicitly for corrupted prompts."
            )
        out["IO"][row], out["S1"][row], out["S2"][row], out["END"][row] = io_pos, s1, s2, end
    out["S1+1"] = out["S1"] + 1
    return out


def canonical_word_idx(word_idx, n: int) -> dict[str, np.ndarray]:
    """Normalise a user-given word_idx (aliases allowed; ``S1+1`` derived if absent)."""
    given = {
        WORD_IDX_ALIASES.get(k, k): np.asarray(torch.as_tensor(v).cpu(), dtype=np.int64)
        for k, v in dict(word_idx).items()
    }
    if "S1+1" not in given and "S1" in given:
        given["S1+1"] = given["S1"] + 1
    missing = [k for k in WORD_IDX_KEYS if k not in given]
    if missing:
        raise ValueError(f"word_idx lacks {missing}; it needs {list(WORD_IDX_KEYS)}.")
    for key in WORD_IDX_KEYS:
        if given[key].shape != (n,):
            raise ValueError(f"word_idx[{key!r}] has shape {given[key].shape}, expected ({n},).")
    return {key: given[key] for key in WORD_IDX_KEYS}


def check_word_idx_in_bounds(word_idx: dict[str, np.ndarray], lengths: np.ndarray) -> None:
    """Every position lies inside its prompt, and END + 1 is the prompt's last token."""
    for key in WORD_IDX_KEYS:
        bad = np.nonzero((word_idx[key] < 0) | (word_idx[key] >= lengths))[0]
        if bad.size:
            raise ValueError(f"word_idx[{key!r}] falls outside prompt {int(bad[0])}.")
    bad = np.nonzero(word_idx["END"] + 2 != lengths)[0]
    if bad.size:
        raise ValueError(
            f"word_idx['END'] of prompt {int(bad[0])} is not the token before the answer "
            "(the prompt's last token)."
        )


def to_word_idx(arrays: dict[str, np.ndarray], device) -> WordIdx:
    """Wrap position arrays as LongTensors on ``device``."""
    return WordIdx(
        {key: torch.as_tensor(arrays[key], dtype=torch.long).to(device) for key in WORD_IDX_KEYS}
    )

"""Test helpers shared by the patching and ablation tests: sharp tiny models and IOI-like batches.

``sharp_model``: a tiny random GPT-2 (real tokenizer) with a larger initialisation scale (0.2
instead of 0.02), so that attention is sharp and patching / ablation effects are O(0.1-1) rather
than O(1e-3): a 1e-4 tolerance then actually discriminates.

``make_batch``: IOI-like prompts from a few templates of different lengths, right-padded with
50256 (optionally with BOS), plus a position-aligned "ABC" batch (every name replaced by a fresh
one), the per-prompt positions and answer ids, and the template groups.
"""

from __future__ import annotations

import functools

import torch
from transformers import GPT2LMHeadModel

from ioi.models import bridge_from_hf, parse_random_spec, random_gpt2_config
from ioi.tokenizer import get_gpt2_tokenizer

PAD = 50256
NAMES = (" Mary", " John", " Tom", " James", " Alice", " Paul", " Anna", " Kate", " Mark", " Lisa",
         " David", " Laura", " Adam", " Rose", " Peter", " Emma")
TEMPLATES = (
    "When{A} and{B} went to the store,{B} gave a drink to",
    "Then,{B} and{A} had a long and really fun day at the park.{B} gave a ring to",
    "After{A} and{B} went to the house,{B} handed a book to",
)


@functools.lru_cache(maxsize=None)
def sharp_model(spec: str = "random-L3-H4-D16", init: float = 0.2, seed: int = 0):
    """A tiny random GPT-2 bridge (processed as ``load_model`` does) with init scale ``init``."""
    n_layers, n_heads, d_head = parse_random_spec(spec)
    config = random_gpt2_config(n_layers, n_heads, d_head)
    config.initializer_range = init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(config).eval()
    return bridge_from_hf(hf, get_gpt2_tokenizer(), device=torch.device("cpu"))


@functools.lru_cache(maxsize=None)
def make_batch(n: int = 5, bos: bool = False, seed: int = 0, n_names: int = 16, n_templates: int = 3):
    """(toks, abc_toks, word_idx, io_ids, s_ids, groups) for ``n`` prompts drawn from the first
    ``n_names`` names and ``n_templates`` templates (template ``i % n_templates`` for prompt i)."""
    tok = get_gpt2_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    names, templates = NAMES[:n_names], TEMPLATES[:n_templates]
    assert all(len(tok.encode(name)) == 1 for name in names)
    ids = [tok.encode(name)[0] for name in names]
    rows, rows_new, info, template_of = [], [], [], []
    for i in range(n):
        t = i % len(templates)
        a, b, x, y, z = (ids[p] for p in torch.randperm(len(ids), generator=gen)[:5].tolist())
        seq, seq_new, where = [], [], {"A": [], "B": []}
        for part in templates[t].replace("{A}", "|A|").replace("{B}", "|B|").split("|"):
            if part in ("A", "B"):
                where[part].append(len(seq))
                seq.append(a if part == "A" else b)
                seq_new.append(x if part == "A" else (y if len(where["B"]) == 1 else z))
            elif part:
                seq += tok.encode(part)
                seq_new += tok.encode(part)
        shift = int(bos)
        if bos:
            seq, seq_new = [PAD] + seq, [PAD] + seq_new
        info.append((where["A"][0] + shift, where["B"][0] + shift, where["B"][1] + shift, len(seq) - 1, a, b))
        rows.append(seq)
        rows_new.append(seq_new)
        template_of.append(t)
    S = max(len(r) for r in rows)
    toks = torch.full((n, S), PAD, dtype=torch.long)
    new = toks.clone()
    for i, (r, rn) in enumerate(zip(rows, rows_new)):
        toks[i, : len(r)] = torch.tensor(r)
        new[i, : len(rn)] = torch.tensor(rn)
    t = torch.tensor(info)
    word_idx = {"IO": t[:, 0], "S1": t[:, 1], "S1+1": t[:, 1] + 1, "S2": t[:, 2], "END": t[:, 3]}
    template_of = torch.tensor(template_of)
    groups = [torch.nonzero(template_of == k).flatten() for k in range(len(templates)) if (template_of == k).any()]
    return toks, new, word_idx, t[:, 4], t[:, 5], groups

"""ioi.analysis on tiny random GPT-2s: DLA / logit lens sum to the model's LD at each prompt's own
END of right-padded batches (with and without BOS), copy and repeated-token scores equal slow
step-by-step loops, constructed heads get the scores they must, the scatter table is exact."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from ioi.analysis import (
    answer_residual_directions,
    attention_projection_frame,
    attention_to_positions,
    copy_scores,
    dla_attn_bias,
    dla_per_head,
    dla_per_layer,
    generate_repeated_tokens,
    head_scores,
    logit_lens,
    scatter_correlations,
    top_heads,
)
from ioi.metrics import logit_diff
from ioi.models import load_model

PAD = 50256
TOL = dict(atol=1e-4, rtol=0)
SPECS = ("random-L2-H4-D16", "random-L3-H2-D8")

# (template, IO, S): IOI-like prompts of different token lengths; {A}/{B} = first two names, then S.
PROMPTS = [
    ("When{A} and{B} went to the store,{S} gave a drink to", " Mary", " John"),
    ("Then,{A} and{B} had a long and really crazy argument. Afterwards,{S} said to", " Tom", " Alice"),
    ("After{A} and{B} went to the park,{S} gave a ring to", " James", " Sarah"),
    ("When{A} and{B} got a snack at the restaurant,{S} decided to give it to", " Anna", " Paul"),
    ("Friends{A} and{B} found a bone at the garden.{S} gave it to", " John", " Mary"),
    ("While{A} and{B} were working at the office,{S} gave a kiss to", " Sarah", " Tom"),
]


def make_batch(tokenizer, bos: bool, abba: tuple[bool, ...] = (True, False, True, False, True, False)):
    """Right-padded IOI-like batch (pad 50256) and its per-prompt positions and answer ids."""
    rows, io_pos, s1_pos, s2_pos, io_ids, s_ids = [], [], [], [], [], []
    for (template, io, s), io_first in zip(PROMPTS, abba):
        a, b = (io, s) if io_first else (s, io)
        ids = tokenizer.encode(template.format(A=a, B=b, S=s))
        if bos:
            ids = [PAD] + ids
        io_id, s_id = tokenizer.encode(io)[0], tokenizer.encode(s)[0]
        s_positions = [i for i, t in enumerate(ids) if t == s_id]
        assert len(s_positions) == 2 and ids.count(io_id) == 1
        rows.append(ids)
        io_pos.append(ids.index(io_id))
        s1_pos.append(s_positions[0])
        s2_pos.append(s_positions[1])
        io_ids.append(io_id)
        s_ids.append(s_id)
    length = max(len(r) for r in rows)
    toks = torch.tensor([r + [PAD] * (length - len(r)) for r in rows])
    end = torch.tensor([len(r) - 1 for r in rows])
    assert len(set(end.tolist())) > 1  # genuinely padded
    as_t = torch.tensor
    return dict(
        toks=toks, end=end, io_pos=as_t(io_pos), s1_pos=as_t(s1_pos), s2_pos=as_t(s2_pos),
        io_ids=as_t(io_ids), s_ids=as_t(s_ids),
    )


def perturb_biases(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give the (zero-initialised) attention / MLP / unembedding biases random values so every
    bias term of the decompositions is exercised. Edits propagate to the forward pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for module in (block.attn.v, block.attn.o, block.attn.q, block.mlp.out):
                bias = module._original_component.bias
                bias.add_(scale * torch.randn(bias.shape, generator=generator))
        b_U = model.b_U
        if isinstance(b_U, torch.nn.Parameter):
            b_U.add_(scale * torch.randn(b_U.shape, generator=generator))


@pytest.fixture(scope="module", params=SPECS)
def model(request):
    m = load_model(request.param, device="cpu", seed=1)
    perturb_biases(m, seed=1)
    return m


@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "bos"])
def batch(request, tokenizer):
    return make_batch(tokenizer, bos=request.param)


def model_ld(model, b):
    logits = model(b["toks"])
    return logit_diff(logits, b["end"], b["io_ids"], b["s_ids"], per_prompt=True)


def args(b):
    return b["end"], b["io_ids"], b["s_ids"]


# ----------------------------------------------------------------------------------------------
# Logit attribution
# ----------------------------------------------------------------------------------------------


def test_biases_are_live(model):
    assert model.b_V.abs().max() > 0 and model.b_O.abs().max() > 0


def test_answer_directions(model, batch):
    d = answer_residual_directions(model, batch["io_ids"], batch["s_ids"])
    assert d.shape == (len(batch["end"]), model.cfg.d_model)
    torch.testing.assert_close(d[0], model.W_U[:, batch["io_ids"][0]] - model.W_U[:, batch["s_ids"][0]])


def test_dla_per_layer_sums_to_model_logit_diff(model, batch):
    ld = model_ld(model, batch)
    values, labels = dla_per_layer(model, batch["toks"], *args(batch), per_prompt=True)
    n_layers = model.cfg.n_layers
    assert labels[:2] == ["embed", "pos_embed"] and labels[-1] == "b_U"
    assert len(labels) == 2 + 2 * n_layers + 1 == values.shape[0]
    torch.testing.assert_close(values.sum(0), ld, **TOL)
    mean_values, _ = dla_per_layer(model, batch["toks"], *args(batch))
    torch.testing.assert_close(mean_values.sum(), ld.mean(), **TOL)


def test_dla_per_head_plus_b_O_equals_attn_out(model, batch):
    _, cache = model.run_with_cache(batch["toks"])
    layers, labels = dla_per_layer(model, cache, *args(batch), per_prompt=True)
    heads = dla_per_head(model, cache, *args(batch), per_prompt=True)
    bias = dla_attn_bias(model, cache, *args(batch), per_prompt=True)
    assert heads.shape == (model.cfg.n_layers, model.cfg.n_heads, len(batch["end"]))
    assert bias.abs().max() > 0
    for layer in range(model.cfg.n_layers):
        attn_out = layers[labels.index(f"{layer}_attn_out")]
        torch.testing.assert_close(heads[layer].sum(0) + bias[layer], attn_out, **TOL)
    torch.testing.assert_close(
        dla_per_head(model, cache, *args(batch)), heads.mean(-1), atol=1e-6, rtol=0
    )


def test_dla_per_head_matches_manual_head_outputs(model, batch):
    """Per-head DLA = (z[END] @ W_O[h], centred, / cached final LN scale) . (W_U[IO] - W_U[S])."""
    _, cache = model.run_with_cache(batch["toks"])
    heads = dla_per_head(model, cache, *args(batch), per_prompt=True)
    rows = torch.arange(len(batch["end"]))
    scale = cache["ln_final.hook_scale"][rows, batch["end"]]  # [batch, 1]
    direction = model.W_U[:, batch["io_ids"]] - model.W_U[:, batch["s_ids"]]  # [d, batch]
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, batch["end"]]  # [batch, head, d_head]
        for head in range(model.cfg.n_heads):
            out = z[:, head] @ model.W_O[layer, head]
            out = (out - out.mean(-1, keepdim=True)) / scale
            torch.testing.assert_close(heads[layer, head], (out * direction.T).sum(-1), **TOL)


def test_logit_lens_last_component_is_model_logit_diff(model, batch):
    ld = model_ld(model, batch)
    values, labels = logit_lens(model, batch["toks"], *args(batch), per_prompt=True)
    assert labels[0] == "0_pre" and labels[1] == "0_mid" and labels[-1] == "final_post"
    assert values.shape == (2 * model.cfg.n_layers + 1, len(ld))
    torch.testing.assert_close(values[-1], ld, **TOL)
    own, _ = logit_lens(model, batch["toks"], *args(batch), per_prompt=True, recompute_ln=True)
    torch.testing.assert_close(own[-1], ld, **TOL)  # the final residual's own scale is the cached one
    # The first component is the embeddings: equal to the sum of the embed + pos_embed DLA terms.
    layers, _ = dla_per_layer(model, batch["toks"], *args(batch), per_prompt=True)
    torch.testing.assert_close(values[0], layers[0] + layers[1] + layers[-1], **TOL)


def test_matches_transformer_lens_recipe_on_unpadded_batch(model, tokenizer):
    """Where END is the last position (no padding), the seed/ARENA recipe with
    pos_slice=-1 and the cache helpers gives the same per-layer and per-head values."""
    full = make_batch(tokenizer, bos=False)
    end = int(full["end"].min())  # truncate every prompt there: an unpadded batch, END = last
    b = dict(full, toks=full["toks"][:, : end + 1], end=torch.full_like(full["end"], end))
    _, cache = model.run_with_cache(b["toks"])
    direction = answer_residual_directions(model, b["io_ids"], b["s_ids"])
    stack, _ = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    expected = torch.einsum("cbd,bd->c", cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1), direction)
    values, _ = dla_per_layer(model, cache, *args(b), include_bias=False)
    torch.testing.assert_close(values, expected / len(b["end"]), **TOL)
    heads_stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)
    expected_heads = torch.einsum("cbd,bd->c", heads_stack, direction) / len(b["end"])
    torch.testing.assert_close(
        dla_per_head(model, cache, *args(b)).flatten(), expected_heads, **TOL
    )


def test_cache_and_tokens_give_the_same_result(model, batch):
    _, cache = model.run_with_cache(batch["toks"])
    a, _ = logit_lens(model, cache, *args(batch), per_prompt=True)
    b, _ = logit_lens(model, batch["toks"], *args(batch), per_prompt=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_attention_to_positions_and_top_heads(model, batch):
    _, cache = model.run_with_cache(batch["toks"])
    layer = model.cfg.n_layers - 1
    keys = {"IO": batch["io_pos"], "S": (batch["s1_pos"], batch["s2_pos"]), "S2": batch["s2_pos"]}
    out = attention_to_positions(cache, None, layer, 1, batch["end"], keys)
    all_heads = attention_to_positions(model, batch["toks"], layer, None, batch["end"], keys)
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
    for i in range(len(batch["end"])):
        e = batch["end"][i]
        assert out["IO"][i] == pytest.approx(float(pattern[i, 1, e, batch["io_pos"][i]]), abs=1e-6)
        s = pattern[i, 1, e, batch["s1_pos"][i]] + pattern[i, 1, e, batch["s2_pos"][i]]
        assert out["S"][i] == pytest.approx(float(s), abs=1e-6)
    assert all_heads["S2"].shape == (len(batch["end"]), model.cfg.n_heads)
    torch.testing.assert_close(all_heads["IO"][:, 1], out["IO"], atol=1e-6, rtol=0)

    scores = torch.tensor([[0.1, 0.5, -0.3], [0.9, -2.0, 0.2]])
    assert top_heads(scores, 2) == [(1, 0), (0, 1)]
    assert top_heads(scores, 2, largest=False) == [(1, 1), (0, 2)]


# ----------------------------------------------------------------------------------------------
# Copy scores
# ----------------------------------------------------------------------------------------------


def slow_copy_scores(model, b, negative=False, k=5, variant="paper"):
    """Literal per-head, per-position loop of the paper code's / ARENA's steps."""
    _, cache = model.run_with_cache(b["toks"])
    resid0 = cache["blocks.0.hook_resid_post"]
    rows = torch.arange(len(b["end"]))
    sign = -1.0 if negative else 1.0
    scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            hits = total = 0
            for key, names in (("io_pos", "io_ids"), ("s1_pos", "s_ids"), ("s2_pos", "s_ids")):
                name_ids = b[names]
                if variant == "paper":
                    r = resid0[rows, b[key]]  # 1. residual after block 0 at the name
                    r = model.blocks[1].ln1(r)  # 2. ln1 normalisation
                    v = r @ model.W_V[layer, head] + model.b_V[layer, head]  # 3. W_V + b_V
                    out = sign * (v @ model.W_O[layer, head])  # 4. W_O, no b_O
                else:
                    e = model.W_E[name_ids]
                    r = e + model.blocks[0].mlp(model.blocks[0].ln2(e[None]))[0]
                    out = sign * (r @ (model.W_V[layer, head] @ model.W_O[layer, head]))
                logits = model.unembed(model.ln_final(out[None]))[0]  # 5. ln_final, unembed
                top = torch.topk(logits, k, dim=-1).indices  # 6. own name in the top k
                hits += int((top == name_ids[:, None]).any(-1).sum())
                total += len(name_ids)
            scores[layer, head] = hits / total
    return scores


@pytest.mark.parametrize("negative", [False, True])
def test_copy_scores_match_slow_loop(model, batch, negative):
    positions = {"IO": batch["io_pos"], "S1": batch["s1_pos"], "S2": batch["s2_pos"]}
    fast = copy_scores(model, batch["toks"], positions, negative=negative)
    slow = slow_copy_scores(model, batch, negative=negative)
    assert fast.shape == (model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    # One sample per chunk, a subset of heads, explicit name ids: the same scores.
    some = [(0, 0), (model.cfg.n_layers - 1, model.cfg.n_heads - 1)]
    names = {"IO": batch["io_ids"], "S1": batch["s_ids"], "S2": batch["s_ids"]}
    subset = copy_scores(
        model, batch["toks"], positions, names, negative=negative, heads=some, max_logit_elements=1
    )
    for layer, head in some:
        assert subset[layer, head] == pytest.approx(float(slow[layer, head]), abs=1e-6)
    assert int(torch.isnan(subset).sum()) == subset.numel() - len(some)


def test_both_signs_at_once_match_the_slow_loop(model, batch):
    from ioi.analysis import copy_scores_both_signs, paper_copy_inputs

    positions = {"IO": batch["io_pos"], "S1": batch["s1_pos"], "S2": batch["s2_pos"]}
    resid, names = paper_copy_inputs(model, batch["toks"], positions)
    both = copy_scores_both_signs(model, resid, names, max_logit_elements=7 * model.cfg.d_vocab)
    for negative in (False, True):
        torch.testing.assert_close(both[negative], slow_copy_scores(model, batch, negative=negative),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 5, 300, 3000])
def test_bounded_copy_hits_equal_the_dense_kernel(model, batch, k):
    """The bounded rank test (the default) gives the dense kernel's per-sample hits, both signs,
    at small k (most samples decided by the block bounds), large k (open blocks counted token by
    token, whole rows counted) and chunks of one or several samples; the scores are their means."""
    from ioi.analysis import copy_score_hits, copy_scores_both_signs, paper_copy_inputs, score_grid

    positions = {"IO": batch["io_pos"], "S1": batch["s1_pos"], "S2": batch["s2_pos"]}
    resid, names = paper_copy_inputs(model, batch["toks"], positions)
    dense = copy_score_hits(model, resid, names, k=k, method="dense")
    for max_logit_elements in (1, 5 * model.cfg.d_vocab):
        bounded = copy_score_hits(model, resid, names, k=k, max_logit_elements=max_logit_elements)
        for negative in (False, True):
            assert torch.equal(bounded[negative], dense[negative]), (negative, max_logit_elements)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    assert dense[False].shape == (n_heads, len(names)) and dense[False].dtype == torch.bool
    if k == 3000:  # a rank test that every head passes sometimes and fails sometimes
        assert 0 < int(dense[False].sum()) < dense[False].numel()
    scores = copy_scores_both_signs(model, resid, names, k=k)
    for negative in (False, True):
        torch.testing.assert_close(scores[negative], score_grid(model, dense[negative]))


class _IntegerValues:
    """Stand-in for the per-head value factorisation with small integers: every product and logit
    is exact in fp32, so ties with the own name's logit are frequent and exact."""

    def __init__(self, seed: int, n_heads=3, n_samples=40, d_head=3, d_model=5, vocab=1000):
        g = torch.Generator().manual_seed(seed)
        self.v = torch.randint(-2, 3, (n_heads, n_samples, d_head), generator=g).float()
        self.A = torch.randint(-2, 3, (n_heads, d_head, d_model), generator=g).float()
        self.W_U = torch.randint(-2, 3, (d_model, vocab), generator=g).float()
        self.const = torch.randint(-40, 41, (vocab,), generator=g).float()  # spread within blocks
        self.W_V = torch.zeros(n_heads, 1, 1)  # only its length is read
        # Own names near the top: half the samples take head 0's r-th largest positive logit,
        # half head 1's r-th largest negative one (r < 8), so small k sees hits, misses and ties.
        product = torch.einsum("hsd,hdm,mv->hsv", self.v, self.A, self.W_U)
        rank = torch.randint(0, 8, (n_samples,), generator=g)
        positive = (product[0] + self.const).argsort(-1, descending=True)
        negative = (self.const - product[1]).argsort(-1, descending=True)
        half = n_samples // 2
        rows = torch.arange(n_samples)
        self.names = torch.where(rows < half, positive[rows, rank], negative[rows, rank])

    def scaled_values(self, index):
        return self.v[index]

    def readout(self, index, W_U):
        return self.A[index] @ W_U


@pytest.mark.parametrize("seed", [0, 1])
def test_bounded_rank_test_is_exact_under_ties(seed):
    """Integer logits (many exact ties; a tied token does not push the own name out), a vocabulary
    that fills no whole block or tile (padding), several tiles: both kernels equal a brute-force
    count in integers."""
    from ioi.analysis.copy_scores import _bounded_hits, _dense_hits

    values = _IntegerValues(seed)
    product = torch.einsum("hsd,hdm,mv->hsv", values.v.long(), values.A.long(), values.W_U.long())
    const = values.const.long()
    for k in (1, 3, 6, 40):
        for negative in (False, True):
            logits = const - product if negative else product + const
            own = logits.gather(-1, values.names.expand(product.shape[0], -1)[..., None])
            above = (logits > own).sum(-1)
            expected = above < k
            assert 0 < int(expected.sum()) < expected.numel()  # hits and misses
            assert int(((logits == own).sum(-1) > 1).sum()) > 0  # ties with the own logit
            dense = _dense_hits(values, values.W_U, values.names, (negative,), k, chunk=7)
            for chunk, block, tile in ((7, 16, 64), (40, 128, 256), (1, 32, 32)):
                bounded = _bounded_hits(values, values.W_U, values.names, (negative,), k, chunk, block, tile)
                assert torch.equal(bounded[negative], expected), (k, negative, chunk, block, tile)
            assert torch.equal(dense[negative], expected)


def test_arena_copy_scores_match_slow_loop(model, batch):
    positions = {"IO": batch["io_pos"], "S1": batch["s1_pos"], "S2": batch["s2_pos"]}
    fast = copy_scores(model, batch["toks"], positions, variant="arena")
    torch.testing.assert_close(fast, slow_copy_scores(model, batch, variant="arena"), atol=1e-6, rtol=0)
    unique = torch.cat([batch["io_ids"], batch["s_ids"]]).unique()
    by_list = copy_scores(model, None, None, unique, variant="arena", heads=[(0, 1)])
    assert torch.isnan(by_list).sum() == by_list.numel() - 1 and 0 <= by_list[0, 1] <= 1


def test_copy_scores_warn_when_value_biases_are_folded(model, batch, monkeypatch):
    positions = {"IO": batch["io_pos"], "S1": batch["s1_pos"], "S2": batch["s2_pos"]}
    monkeypatch.setattr(model, "ioi_info", types.SimpleNamespace(processing={"fold_value_biases": True}))
    with pytest.warns(UserWarning, match="fold_value_biases"):
        copy_scores(model, batch["toks"], positions, heads=[(0, 0)])
    monkeypatch.setattr(model, "ioi_info", types.SimpleNamespace(processing={"fold_value_biases": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy_scores(model, batch["toks"], positions, heads=[(0, 0)])


def set_head_ov(model, layer, head, W_V_h, b_V_h, W_O_h):
    """Write one head's W_V [d_model, d_head], b_V [d_head] and W_O [d_head, d_model] into the
    bridge's weights, checking the accessors read them back."""
    d_head = model.cfg.d_head
    rows = slice(head * d_head, (head + 1) * d_head)
    attn = model.blocks[layer].attn
    with torch.no_grad():
        attn.v._original_component.weight[rows] = W_V_h.T
        attn.v._original_component.bias[rows] = b_V_h
        attn.o._original_component.weight[rows] = W_O_h
    torch.testing.assert_close(model.W_V[layer, head], W_V_h)
    torch.testing.assert_close(model.b_V[layer, head], b_V_h)
    torch.testing.assert_close(model.W_O[layer, head], W_O_h)


@pytest.mark.parametrize("bos", [False, True])
def test_constructed_copying_head_scores_one(tokenizer, bos):
    """A head whose OV maps each name's (ln1-normalised) layer-0 residual onto the name's own
    unembedding direction has copy score 1 and negative copy score 0."""
    model = load_model("random-L2-H4-D16", device="cpu", seed=2)
    b = make_batch(tokenizer, bos=bos)
    positions = {"IO": b["io_pos"], "S1": b["s1_pos"], "S2": b["s2_pos"]}
    layer, head = 1, 2
    _, cache = model.run_with_cache(b["toks"])
    rows = torch.arange(len(b["end"]))
    resid = torch.cat([cache["blocks.0.hook_resid_post"][rows, positions[k]] for k in positions])
    names = torch.cat([b["io_ids"], b["s_ids"], b["s_ids"]])
    x = model.blocks[1].ln1(resid)  # [18, 64]: full row rank, so x @ M = T is solvable exactly
    target = model.W_U[:, names].T * 10.0
    M = torch.linalg.pinv(x.double()) @ target.double()  # rank <= #distinct names (12) <= d_head
    U, S, Vh = torch.linalg.svd(M)
    d_head = model.cfg.d_head
    W_V_h = (U[:, :d_head] * S[:d_head]).float()
    W_O_h = Vh[:d_head].float()
    set_head_ov(model, layer, head, W_V_h, torch.zeros(d_head), W_O_h)
    torch.testing.assert_close(x @ W_V_h @ W_O_h, target, atol=1e-3, rtol=1e-3)

    positive = copy_scores(model, b["toks"], positions)
    negative = copy_scores(model, b["toks"], positions, negative=True, heads=[(layer, head)])
    assert positive[layer, head] == pytest.approx(1.0)
    assert negative[layer, head] == pytest.approx(0.0)
    assert top_heads(positive, 1) == [(layer, head)]


# ----------------------------------------------------------------------------------------------
# Repeated random tokens
# ----------------------------------------------------------------------------------------------


def test_generate_repeated_tokens():
    toks = generate_repeated_tokens(batch=3, seq_len=7, seed=5)
    assert toks.shape == (3, 14) and toks.dtype == torch.long
    assert torch.equal(toks[:, :7], toks[:, 7:])
    assert toks.min() >= 1000 and toks.max() < 10000
    assert torch.equal(toks, generate_repeated_tokens(batch=3, seq_len=7, seed=5))
    assert not torch.equal(toks, generate_repeated_tokens(batch=3, seq_len=7, seed=6))
    with_bos = generate_repeated_tokens(batch=3, seq_len=7, seed=5, prepend_bos=True)
    assert with_bos.shape == (3, 15) and (with_bos[:, 0] == PAD).all()
    assert torch.equal(with_bos[:, 1:], toks)


def slow_head_scores(model, tokens, seq_len):
    _, cache = model.run_with_cache(tokens)
    b = tokens.shape[1] - 2 * seq_len
    T = tokens.shape[1]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = {k: torch.zeros(L, H) for k in ("previous_token", "duplicate_token", "induction",
                                          "next_token_contribution")}
    for layer in range(L):
        p = cache[f"blocks.{layer}.attn.hook_pattern"]
        z = cache[f"blocks.{layer}.attn.hook_z"]
        for h in range(H):
            prev = [p[n, h, i, i - 1] for n in range(len(tokens)) for i in range(b + 1, T)]
            dup = [p[n, h, i, i - seq_len] for n in range(len(tokens)) for i in range(b + seq_len, T)]
            ind = [p[n, h, i, i - seq_len + 1] for n in range(len(tokens)) for i in range(b + seq_len, T)]
            nxt = [
                (z[n, i, h] @ model.W_O[layer, h]) @ model.W_U[:, tokens[n, i + 1]]
                for n in range(len(tokens))
                for i in range(b + seq_len, T - 1)
            ]
            for key, vals in zip(out, (prev, dup, ind, nxt)):
                out[key][layer, h] = torch.stack(vals).mean()
    return out


@pytest.mark.parametrize("bos", [False, True])
def test_repeated_token_scores_match_slow_loop(model, bos):
    seq_len = 9
    tokens = generate_repeated_tokens(batch=3, seq_len=seq_len, seed=1, prepend_bos=bos)
    fast = head_scores(model, tokens, seq_len)
    slow = slow_head_scores(model, tokens, seq_len)
    assert set(fast) == set(slow)
    for key in slow:
        assert fast[key].shape == (model.cfg.n_layers, model.cfg.n_heads)
        torch.testing.assert_close(fast[key], slow[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("bos", [False, True])
def test_forced_previous_token_head_scores_one(model, bos):
    seq_len = 10
    tokens = generate_repeated_tokens(batch=2, seq_len=seq_len, seed=3, prepend_bos=bos)
    T = tokens.shape[1]
    prev = torch.zeros(T, T)
    prev[0, 0] = 1.0
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    induct = torch.zeros(T, T)  # i -> i - seq_len + 1 in the second half, i -> 0 elsewhere
    induct[:, 0] = 1.0
    second = torch.arange(T - seq_len, T)
    induct[second, 0] = 0.0
    induct[second, second - seq_len + 1] = 1.0

    def force(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = prev
        pattern[:, 1] = induct
        return pattern

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", force)]):
        scores = head_scores(model, tokens, seq_len)  # runs the model itself, under the hook
        _, cache = model.run_with_cache(tokens)
    assert scores["previous_token"][0, 0] == pytest.approx(1.0)
    assert scores["duplicate_token"][0, 0] == pytest.approx(0.0)
    assert scores["induction"][0, 1] == pytest.approx(1.0)
    assert scores["previous_token"][0, 1] < 0.5
    from_cache = head_scores(model, tokens, seq_len, cache=cache)
    torch.testing.assert_close(from_cache["previous_token"], scores["previous_token"])
    assert top_heads(scores["previous_token"], 1) == [(0, 0)]


# ----------------------------------------------------------------------------------------------
# Scatter (Fig. 3c / 16)
# ----------------------------------------------------------------------------------------------


def test_attention_projection_frame(model, batch):
    layer, head = model.cfg.n_layers - 1, 1
    _, cache = model.run_with_cache(batch["toks"])
    frame = attention_projection_frame(
        model, batch["toks"], (layer, head), batch["end"], batch["io_pos"], batch["s1_pos"],
        batch["s2_pos"], batch["io_ids"], batch["s_ids"],
    )
    n = len(batch["end"])
    assert list(frame.columns) == ["layer", "head", "prompt", "name_kind", "attention", "projection"]
    assert frame.shape == (2 * n, 6)
    assert set(frame.name_kind) == {"IO", "S"} and (frame.groupby("prompt").size() == 2).all()
    assert frame.attention.between(0, 1).all()

    heads = cache.stack_head_results(layer=-1)  # [(layer head), batch, pos, d_model], no b_O
    out = heads[layer * model.cfg.n_heads + head]
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, head]
    for i in range(n):
        e = int(batch["end"][i])
        rows = frame[frame.prompt == i].set_index("name_kind")
        io_proj = float(out[i, e] @ model.W_U[:, batch["io_ids"][i]])
        s_proj = float(out[i, e] @ model.W_U[:, batch["s_ids"][i]])
        assert rows.loc["IO", "projection"] == pytest.approx(io_proj, abs=1e-5)
        assert rows.loc["S", "projection"] == pytest.approx(s_proj, abs=1e-5)
        att_s = pattern[i, e, batch["s1_pos"][i]] + pattern[i, e, batch["s2_pos"][i]]
        assert rows.loc["IO", "attention"] == pytest.approx(float(pattern[i, e, batch["io_pos"][i]]), abs=1e-6)
        assert rows.loc["S", "attention"] == pytest.approx(float(att_s), abs=1e-6)

    several = attention_projection_frame(
        model, cache, [(layer, head), (0, 0)], batch["end"], batch["io_pos"], batch["s1_pos"],
        batch["s2_pos"], batch["io_ids"], batch["s_ids"],
    )
    assert several.shape == (4 * n, 6)
    pd.testing.assert_frame_equal(several.iloc[: 2 * n].reset_index(drop=True), frame, atol=1e-6)


def test_scatter_correlations():
    frame = pd.DataFrame(
        {
            "layer": 9, "head": 9, "prompt": np.repeat(np.arange(4), 2),
            "name_kind": ["IO", "S"] * 4,
            "attention": [0.1, 0.2, 0.4, 0.3, 0.9, 0.05, 0.6, 0.5],
            "projection": [1.0, 2.0, 4.0, 3.0, 9.0, 0.5, 6.0, 5.0],
        }
    )
    corr = scatter_correlations(frame).set_index("name_kind")
    assert list(corr.index) == ["IO", "S", "pooled"]
    np.testing.assert_allclose(corr.pearson_r, 1.0)
    assert corr.loc["pooled", "n"] == 8 and corr.loc["IO", "n"] == 4
    frame.loc[frame.name_kind == "S", "projection"] *= -1
    corr = scatter_correlations(frame).set_index("name_kind")
    assert corr.loc["S", "pearson_r"] == pytest.approx(-1.0)
    expected = np.corrcoef(frame.attention, frame.projection)[0, 1]
    assert corr.loc["pooled", "pearson_r"] == pytest.approx(expected)


def test_one_layer_model_copy_scores_and_dla(tokenizer):
    """Block 1 does not exist in a 1-layer model: ln1 falls back to block 0 (same normalisation)."""
    model = load_model("random-L1-H3-D12", device="cpu", seed=0)
    b = make_batch(tokenizer, bos=False)
    positions = {"IO": b["io_pos"], "S1": b["s1_pos"], "S2": b["s2_pos"]}
    scores = copy_scores(model, b["toks"], positions)
    assert scores.shape == (1, 3) and bool(((scores >= 0) & (scores <= 1)).all())
    values, _ = dla_per_layer(model, b["toks"], *args(b), per_prompt=True)
    torch.testing.assert_close(values.sum(0), model_ld(model, b), **TOL)

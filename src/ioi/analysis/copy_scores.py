"""Copy scores and negative copy scores of every attention head (paper §3.1; the paper code's
``check_copy_circuit``), vectorised over heads.

**Definition (``variant="paper"``, the default; paper code [C] step by step).** For ``N`` prompts:

1. take the residual stream after block 0 (``blocks.0.hook_resid_post`` = embeddings + attention
   layer 0 + MLP0) at each prompt's IO, S1 and S2 positions: ``3N`` samples ``r``;
2. apply block 1's ``ln1`` (``model.blocks[1].ln1``; with ``fold_ln`` it is normalisation only:
   ``(r - mean(r)) / sqrt(mean((r - mean(r))^2) + eps)`` over ``d_model``);
3. multiply by the head's ``W_V[l, h]`` and **add** its ``b_V[l, h]``;
4. multiply by ``W_O[l, h]`` (``b_O`` **not** added), times ``-1`` for the negative copy score;
5. apply ``ln_final``, then unembed (``@ W_U + b_U``);
6. a sample is a hit when its own name token (the token at that position; the IO name at IO, the S
   name at S1 and S2) is among the ``k = 5`` largest logits (``torch.topk``).

The score is ``hits / 3N`` in [0, 1] (the paper reports percentages). Step 3 needs the head's own
``b_V``: load the model with ``fold_value_biases=False`` (our default; :func:`check_value_biases`
warns otherwise, since folding moves ``b_V @ W_O`` into ``b_O`` and the score changes meaning).

**``variant="arena"``** (ARENA 1.4.1 ``get_copying_scores``): the residual is the name's token
embedding plus MLP0 of it, ``r = W_E[name] + MLP0(ln2_0(W_E[name]))`` (no positional embedding, no
attention layer 0), multiplied by ``W_V[l, h] @ W_O[l, h]`` (no ``ln1`` normalisation, no ``b_V``),
then ``ln_final``, unembed and the same top-k test. The samples are the same name tokens (those at
IO, S1, S2 of each prompt) unless a 1-D tensor of name ids (e.g. each name once, as ARENA) is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ioi.analysis._common import final_ln_affine, as_index, gather_positions, model_device, run_cache, unembed_bias

__all__ = [
    "COPY_POSITIONS",
    "copy_scores",
    "copy_scores_from_resid",
    "copy_scores_both_signs",
    "copy_score_hits",
    "score_grid",
    "paper_copy_inputs",
    "arena_copy_inputs",
    "check_value_biases",
    "copy_score_definition",
]

COPY_POSITIONS = ("IO", "S1", "S2")
RESID_HOOK = "blocks.0.hook_resid_post"
# Logits (products) held per chunk: 3 * 2**20 floats (12 MiB, ~60 samples of GPT-2's vocabulary). Small
# enough that the rank comparison reads them from cache: ~2x faster on CPU than 256 MiB chunks.
DEFAULT_MAX_LOGIT_ELEMENTS = 3 * 2**20

Variant = Literal["paper", "arena"]


def check_value_biases(model) -> bool:
    """Warn (and return False) if the model's value biases look folded into ``b_O``.

    Uses ``model.ioi_info.processing["fold_value_biases"]`` when present (models from
    :func:`ioi.models.load_model`), else the heuristic "all ``b_V`` are zero while ``b_O`` is not".
    """
    info = getattr(model, "ioi_info", None)
    processing = getattr(info, "processing", None) or {}
    folded = processing.get("fold_value_biases")
    if folded is None:
        folded = bool((model.b_V == 0).all()) and not bool((model.b_O == 0).all())
    if folded:
        warnings.warn(
            "Copy scores: the model's value biases appear folded into b_O (fold_value_biases=True); "
            "the paper's copy score adds each head's own b_V. Load with fold_value_biases=False.",
            stacklevel=3,
        )
    return not folded


def copy_score_definition(variant: Variant = "paper", negative: bool = False, k: int = 5) -> dict:
    """A record of the definition used, for result metadata."""
    if variant == "paper":
        steps = (
            "blocks.0.hook_resid_post at IO,S1,S2 -> blocks[1].ln1 -> @W_V[h]+b_V[h] -> @W_O[h] "
            "(no b_O)" + (" * -1" if negative else "") + " -> ln_final -> unembed -> own name in top-k"
        )
    elif variant == "arena":
        steps = (
            "W_E[name] + MLP0(ln2_0(W_E[name])) -> @(W_V[h] W_O[h]) (no ln1, no biases)"
            + (" * -1" if negative else "") + " -> ln_final -> unembed -> own name in top-k"
        )
    else:
        raise ValueError(f"Unknown copy-score variant {variant!r}; use 'paper' or 'arena'.")
    return {"variant": variant, "negative": negative, "k": k, "steps": steps}


@torch.inference_mode()
def paper_copy_inputs(
    model,
    toks: Int[Tensor, "batch seq"],
    positions: Mapping[str, Int[Tensor, "batch"]],
    name_token_ids: Mapping[str, Int[Tensor, "batch"]] | None = None,
) -> tuple[Float[Tensor, "sample d_model"], Int[Tensor, "sample"]]:
    """Step 1: ``blocks.0.hook_resid_post`` at each prompt's positions, and each sample's name id.

    Samples are ordered position-major (all IO samples, then all S1, then all S2, for the keys of
    ``positions`` in order). Name ids default to the token at the position itself.
    """
    device = model_device(model)
    toks = torch.as_tensor(toks).to(device)
    cache = run_cache(model, toks, [RESID_HOOK])  # runs block 0 only
    resid = cache[RESID_HOOK]
    samples, names = [], []
    for key, pos in positions.items():
        pos = as_index(pos, device)
        samples.append(gather_positions(resid, pos))
        if name_token_ids is None:
            names.append(gather_positions(toks, pos))
        else:
            names.append(as_index(name_token_ids[key], device))
    return torch.cat(samples, dim=0), torch.cat(names, dim=0)


@torch.inference_mode()
def arena_copy_inputs(model, name_token_ids: Int[Tensor, "sample"]) -> Float[Tensor, "sample d_model"]:
    """ARENA's residual for each name: ``W_E[name] + MLP0(ln2_0(W_E[name]))`` (no pos. embedding)."""
    names = as_index(name_token_ids, model_device(model))
    embed = model.embed(names[None])  # [1, sample, d_model]
    block0 = model.blocks[0]
    return (embed + block0.mlp(block0.ln2(embed)))[0]


def _select_heads(model, heads: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if heads is None:
        return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    heads = [(int(layer), int(head)) for layer, head in heads]
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"Head {layer}.{head} is outside the model's {n_layers}x{n_heads} heads.")
    return heads


@torch.inference_mode()
def copy_scores_from_resid(
    model,
    resid: Float[Tensor, "sample d_model"],
    name_ids: Int[Tensor, "sample"],
    *,
    negative: bool = False,
    k: int = 5,
    ln1_normalise: bool = True,
    add_b_V: bool = True,
    ln_layer: int = 1,
    heads: Sequence[tuple[int, int]] | None = None,
    max_logit_elements: int | None = None,
) -> Float[Tensor, "n_layers n_heads"]:
    """Steps 2-6 of the copy score for all (or the given) heads at once.

    ``ln1_normalise``: apply ``model.blocks[ln_layer].ln1`` first (paper: layer 1; block 0 for a
    1-layer model); ``add_b_V``: add
    the head's ``b_V`` after ``W_V``. Samples are processed in chunks so that at most
    ``max_logit_elements`` logits exist at a time. Heads not in ``heads`` are NaN.
    ``negative``: the negative copy score (the head's value negated before ``W_O``).
    """
    scores = copy_scores_both_signs(
        model, resid, name_ids, signs=(negative,), k=k, ln1_normalise=ln1_normalise, add_b_V=add_b_V,
        ln_layer=ln_layer, heads=heads, max_logit_elements=max_logit_elements,
    )
    return scores[negative]


class _ValueLogits:
    """Per-head factorisation of steps 3-5 for all samples: ``logits = P + c`` (``c - P`` for the
    negative score) with ``P = (v / sigma) @ M`` (see :func:`copy_score_hits`)."""

    def __init__(self, model, x, selected, add_b_V: bool):
        device = x.device
        layer_idx = torch.tensor([layer for layer, _ in selected], device=device, dtype=torch.long)
        head_idx = torch.tensor([head for _, head in selected], device=device, dtype=torch.long)
        self.x = x
        self.W_V = model.W_V[layer_idx, head_idx]  # [K, d_model, d_head]
        self.b_V = model.b_V[layer_idx, head_idx] if add_b_V else None  # [K, d_head]
        W_O = model.W_O[layer_idx, head_idx]  # [K, d_head, d_model]
        self.W_O_c = W_O - W_O.mean(-1, keepdim=True)  # rows centred over d_model
        self.gamma, beta = final_ln_affine(model)
        self.eps = float(getattr(model.cfg, "eps", 1e-5))
        self.const = beta @ model.W_U + unembed_bias(model)  # [vocab]

    def scaled_values(self, index: int) -> Float[Tensor, "sample d_head"]:
        """``v / sigma``: the head's value (``+ b_V``) over ``ln_final``'s scale of ``v @ W_O_c``."""
        v = self.x @ self.W_V[index]
        if self.b_V is not None:
            v = v + self.b_V[index]
        out_c = v @ self.W_O_c[index]  # [sample, d_model]
        sigma = (out_c.pow(2).mean(-1) + self.eps).sqrt()  # [sample]
        return v / sigma[:, None]

    def readout(self, index: int, W_U: Tensor) -> Float[Tensor, "d_head vocab"]:
        """``M = (W_O_c * gamma) @ W_U`` (``W_U``'s columns in whatever order it is given)."""
        return (self.W_O_c[index] * self.gamma) @ W_U


def _dense_hits(values: _ValueLogits, W_U, name_ids, signs, k, chunk) -> dict[bool, Tensor]:
    """Reference kernel: every chunk's full logits, then the rank test on them."""
    n_heads, n_samples = values.W_V.shape[0], name_ids.shape[0]
    const = values.const
    hits = {negative: torch.zeros(n_heads, n_samples, dtype=torch.bool, device=name_ids.device)
            for negative in signs}
    for index in range(n_heads):
        v_scaled, M = values.scaled_values(index), values.readout(index, W_U)
        for start in range(0, n_samples, chunk):
            product = v_scaled[start:start + chunk] @ M
            for negative in signs:
                logits = const - product if negative else product + const
                own = logits.gather(-1, name_ids[start:start + chunk, None])
                hits[negative][index, start:start + chunk] = (logits > own).sum(-1) < k
    return hits


class _SortedVocab:
    """The vocabulary reordered by ``c`` and cut into blocks of ``BOUND_BLOCK`` columns (with
    ``-inf``-constant padding columns first), grouped into matmul tiles of ``TILE`` columns."""

    def __init__(self, const: Tensor, W_U: Tensor, block: int, tile: int):
        vocab = const.shape[0]
        tile = min(tile, -(-vocab // block) * block)
        self.block, self.tile = block, tile
        self.n_tiles = -(-vocab // tile)
        self.padded = self.n_tiles * tile
        n_pad = self.padded - vocab
        order = torch.argsort(const)
        self.column = torch.empty_like(order)  # token -> its column in the padded order
        self.column[order] = torch.arange(n_pad, self.padded, device=const.device)
        self.const = torch.cat([const.new_full((n_pad,), float("-inf")), const[order]])  # [padded]
        blocks = self.const.view(-1, block)
        self.c_min, self.c_max = blocks.amin(-1), blocks.amax(-1)  # [n_blocks]
        # W_U's columns in that order (zero for the padding), keeping W_U's memory layout.
        if W_U.stride(0) == 1:  # a transposed view (tied embeddings): gather its rows
            W_U_sorted = W_U.new_zeros(self.padded, W_U.shape[0])
            W_U_sorted[n_pad:] = W_U.t()[order]
            self.W_U = W_U_sorted.t()
        else:
            self.W_U = W_U.new_zeros(W_U.shape[0], self.padded)
            self.W_U[:, n_pad:] = W_U[:, order]


def _bounded_hits(values: _ValueLogits, W_U, name_ids, signs, k, chunk, block, tile) -> dict[bool, Tensor]:
    """The rank test without a pass over every logit for most samples (exact; see
    :func:`copy_score_hits`)."""
    n_heads, n_samples = values.W_V.shape[0], name_ids.shape[0]
    device = name_ids.device
    vocab = _SortedVocab(values.const, W_U, block, tile)
    n_tiles, width, blocks_per_tile = vocab.n_tiles, vocab.tile, vocab.tile // block
    n_blocks = n_tiles * blocks_per_tile
    own_column = vocab.column[name_ids]  # [sample]
    own_const = values.const[name_ids]  # [sample]
    hits = {negative: torch.zeros(n_heads, n_samples, dtype=torch.bool, device=device) for negative in signs}
    chunk = min(chunk, n_samples)
    product = torch.empty(n_tiles, chunk, width, device=device)  # one chunk's P, tile by tile
    block_max = torch.empty(n_tiles, chunk, blocks_per_tile, device=device)
    block_min = torch.empty(n_tiles, chunk, blocks_per_tile, device=device)
    for index in range(n_heads):
        v_scaled = values.scaled_values(index)
        M = values.readout(index, vocab.W_U)  # [d_head, padded]
        tiles = [M[:, t * width:(t + 1) * width] for t in range(n_tiles)]
        for start in range(0, n_samples, chunk):
            stop = min(n_samples, start + chunk)
            rows = stop - start
            v_chunk = v_scaled[start:stop]
            for t, M_tile in enumerate(tiles):  # each tile's P is reduced while it is in cache
                P_tile = torch.mm(v_chunk, M_tile, out=product[t, :rows])
                by_block = P_tile.view(rows, blocks_per_tile, block)
                torch.amax(by_block, -1, out=block_max[t, :rows])
                torch.amin(by_block, -1, out=block_min[t, :rows])
            P = product[:, :rows]  # [tile, row, width]
            column = own_column[start:stop]
            sample = torch.arange(rows, device=device)
            P_own = P[column // width, sample, column % width]  # the very product the blocks hold
            P_max = block_max[:, :rows].permute(1, 0, 2).reshape(rows, n_blocks)
            P_min = block_min[:, :rows].permute(1, 0, 2).reshape(rows, n_blocks)
            for negative in signs:
                if negative:
                    own = own_const[start:stop] - P_own
                    lower, upper = vocab.c_min - P_min, vocab.c_max - P_min
                else:
                    own = P_own + own_const[start:stop]
                    lower, upper = P_max + vocab.c_min, P_max + vocab.c_max
                own = own[:, None]
                # A block whose lower bound beats the own logit holds a token that does: k such
                # blocks decide a miss. Tokens above the own logit lie only in blocks whose upper
                # bound beats it (NaN bounds count as possibly above): those are counted exactly.
                undecided = (lower > own).sum(-1) < k
                open_blocks = ~(upper <= own) & undecided[:, None]
                n_open = open_blocks.sum(-1)
                # Rows with many open blocks: counted over the whole row (cheaper than segments).
                whole = n_open * DENSE_ROW_FRACTION > n_blocks
                open_blocks &= ~whole[:, None]
                above = torch.zeros(rows, dtype=torch.long, device=device)
                pair_row, pair_block = open_blocks.nonzero(as_tuple=True)
                if pair_row.numel():
                    segment = P.view(n_tiles, rows, blocks_per_tile, block)[
                        pair_block // blocks_per_tile, pair_row, pair_block % blocks_per_tile]  # [pair, block]
                    c_segment = vocab.const.view(n_blocks, block)[pair_block]
                    logits = c_segment - segment if negative else segment + c_segment
                    above.index_add_(0, pair_row, (logits > own[pair_row]).sum(-1))
                (dense_row,) = whole.nonzero(as_tuple=True)
                if dense_row.numel():
                    c_tiles = vocab.const.view(n_tiles, 1, width)
                    P_rows = P[:, dense_row]  # [tile, row, width]
                    logits = c_tiles - P_rows if negative else P_rows + c_tiles
                    above[dense_row] = (logits > own[dense_row].view(1, -1, 1)).sum((0, 2))
                hits[negative][index, start:stop] = undecided & (above < k)
    return hits


Method = Literal["bounded", "dense"]
# Bound blocks of 128 sorted columns, reduced in tiles of 4096 columns (the tile's product stays in
# the core's cache between the matmul and the block max/min).
BOUND_BLOCK = 128
BOUND_TILE = 4096
# A row with more than 1/DENSE_ROW_FRACTION of its blocks open is counted over all its tokens.
DENSE_ROW_FRACTION = 3


@torch.inference_mode()
def copy_score_hits(
    model,
    resid: Float[Tensor, "sample d_model"],
    name_ids: Int[Tensor, "sample"],
    *,
    signs: Sequence[bool] = (False, True),
    k: int = 5,
    ln1_normalise: bool = True,
    add_b_V: bool = True,
    ln_layer: int = 1,
    heads: Sequence[tuple[int, int]] | None = None,
    max_logit_elements: int | None = None,
    method: Method = "bounded",
) -> dict[bool, Bool[Tensor, "head sample"]]:
    """Per sample and head, whether the sample's own name is among the head's ``k`` largest logits
    (steps 2-6 of the module docstring), for each ``negative`` in ``signs``: ``{negative: hits}``,
    rows in the order of ``heads`` (default: every head, layer-major). A copy score is the mean
    of a row; a group's score is the mean over its samples.

    A hit is ``#{tokens t: logit_t > logit_own} < k`` (strict: a token tied with the own name does
    not push it out; ``torch.topk`` would break such ties by index).

    Factored, exactly as algebra: the head's output is ``out = v @ W_O`` (``v`` = value ``+ b_V``);
    its centred version is ``v @ W_O_c`` (each row of ``W_O`` centred over ``d_model``), so
    ``ln_final(out) @ W_U + b_U = (v @ M) / sigma + c`` with ``M = (W_O_c * gamma) @ W_U``,
    ``c = beta @ W_U + b_U`` and ``sigma = sqrt(mean(out_c^2) + eps)`` (~12x fewer FLOPs than
    unembedding each d_model vector). The negative score negates ``v``: ``c - P`` with
    ``P = (v / sigma) @ M``, both signs from one ``P``.

    ``method="bounded"`` (default) evaluates the same ``P`` (one matmul per head and chunk) and the
    same rank test, without a pass over all logits of most samples: with the vocabulary sorted by
    ``c`` in blocks of ``BOUND_BLOCK`` tokens, ``max_block(P) + min_block(c)`` is at most some
    token's logit (rounding is monotone) and ``max_block(P) + max_block(c)`` at least every token's,
    so ``k`` blocks whose lower bound beats the own logit decide a miss and only blocks whose upper
    bound beats it are counted token by token (for the negative sign, ``c - min_block(P)``).
    ``method="dense"``: the reference kernel (each chunk's full logits, then the test).
    ``max_logit_elements``: products held at a time (chunk of samples; default 3 * 2**20 on the CPU,
    2**26 on an accelerator).
    """
    device = model_device(model)
    name_ids = as_index(name_ids, device)
    if resid.shape[0] != name_ids.shape[0]:
        raise ValueError(f"{resid.shape[0]} residual samples but {name_ids.shape[0]} name ids.")
    if method not in ("bounded", "dense"):
        raise ValueError(f"Unknown copy-score method {method!r}; use 'bounded' or 'dense'.")
    selected = _select_heads(model, heads)
    # Block 1's ln1 as the paper code; a 1-layer model falls back to block 0's (identical
    # normalisation once LN weights are folded).
    ln_layer = min(ln_layer, model.cfg.n_layers - 1)
    x = model.blocks[ln_layer].ln1(resid) if ln1_normalise else resid
    values = _ValueLogits(model, x, selected, add_b_V)
    W_U = model.W_U
    if max_logit_elements is None:
        max_logit_elements = DEFAULT_MAX_LOGIT_ELEMENTS if device.type == "cpu" else 2**26
    signs = tuple(dict.fromkeys(bool(s) for s in signs))
    if name_ids.numel() == 0:
        return {negative: torch.zeros(len(selected), 0, dtype=torch.bool, device=device) for negative in signs}
    if method == "dense":
        chunk = max(1, max_logit_elements // max(1, W_U.shape[1]))
        return _dense_hits(values, W_U, name_ids, signs, k, chunk)
    chunk = max(1, max_logit_elements // max(1, -(-W_U.shape[1] // BOUND_TILE) * BOUND_TILE))
    return _bounded_hits(values, W_U, name_ids, signs, k, chunk, BOUND_BLOCK, BOUND_TILE)


@torch.inference_mode()
def copy_scores_both_signs(
    model,
    resid: Float[Tensor, "sample d_model"],
    name_ids: Int[Tensor, "sample"],
    *,
    signs: Sequence[bool] = (False, True),
    k: int = 5,
    ln1_normalise: bool = True,
    add_b_V: bool = True,
    ln_layer: int = 1,
    heads: Sequence[tuple[int, int]] | None = None,
    max_logit_elements: int | None = None,
    method: Method = "bounded",
) -> dict[bool, Float[Tensor, "n_layers n_heads"]]:
    """:func:`copy_scores_from_resid` for each ``negative`` in ``signs`` (``{negative: scores}``):
    the mean of :func:`copy_score_hits` per head (heads not in ``heads`` are NaN)."""
    hits = copy_score_hits(
        model, resid, name_ids, signs=signs, k=k, ln1_normalise=ln1_normalise, add_b_V=add_b_V,
        ln_layer=ln_layer, heads=heads, max_logit_elements=max_logit_elements, method=method,
    )
    return {negative: score_grid(model, hit, heads) for negative, hit in hits.items()}


def score_grid(model, hits: Bool[Tensor, "head sample"],
               heads: Sequence[tuple[int, int]] | None = None) -> Float[Tensor, "n_layers n_heads"]:
    """``[n_layers, n_heads]`` grid of the hit fraction of each row of ``hits`` (rows in the order of
    ``heads``, default every head layer-major); NaN for heads not in ``heads``."""
    selected = _select_heads(model, heads)
    scores = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"), device=hits.device)
    if selected:
        layer_idx = torch.tensor([layer for layer, _ in selected], device=hits.device)
        head_idx = torch.tensor([head for _, head in selected], device=hits.device)
        scores[layer_idx, head_idx] = hits.sum(-1).float() / max(1, hits.shape[1])
    return scores


@torch.inference_mode()
def copy_scores(
    model,
    toks: Int[Tensor, "batch seq"] | None,
    positions: Mapping[str, Int[Tensor, "batch"]] | None,
    name_token_ids: Mapping[str, Int[Tensor, "batch"]] | Int[Tensor, "sample"] | None = None,
    *,
    negative: bool = False,
    k: int = 5,
    variant: Variant = "paper",
    heads: Sequence[tuple[int, int]] | None = None,
    max_logit_elements: int | None = None,
) -> Float[Tensor, "n_layers n_heads"]:
    """Copy score (or, with ``negative=True``, negative copy score) of every head, in [0, 1].

    ``positions``: ``{"IO": ..., "S1": ..., "S2": ...}`` (``LongTensor[batch]`` each) on ``toks``
    (right-padded prompts, BOS or not); ``name_token_ids``: the same keys -> name token per prompt
    (default: the token at that position). See the module docstring for the exact definition of
    each ``variant``. For ``variant="arena"`` a 1-D tensor of name ids may be given instead of
    ``toks``/``positions`` (ARENA scores each name of its list once).
    """
    definition = copy_score_definition(variant, negative, k)  # validates variant
    if definition["variant"] == "paper":
        if toks is None or positions is None:
            raise ValueError("The paper copy score needs the prompts' tokens and IO/S1/S2 positions.")
        check_value_biases(model)
        resid, names = paper_copy_inputs(model, toks, positions, name_token_ids)
        return copy_scores_from_resid(
            model, resid, names, negative=negative, k=k, ln1_normalise=True, add_b_V=True,
            heads=heads, max_logit_elements=max_logit_elements,
        )
    if isinstance(name_token_ids, Tensor) and name_token_ids.ndim == 1:
        names = as_index(name_token_ids, model_device(model))
    else:
        if toks is None or positions is None:
            raise ValueError("variant='arena' needs prompts + positions, or a 1-D tensor of name ids.")
        device = model_device(model)
        toks = torch.as_tensor(toks).to(device)
        names = torch.cat(
            [
                gather_positions(toks, as_index(pos, device))
                if name_token_ids is None
                else as_index(name_token_ids[key], device)
                for key, pos in positions.items()
            ]
        )
    resid = arena_copy_inputs(model, names)
    return copy_scores_from_resid(
        model, resid, names, negative=negative, k=k, ln1_normalise=False, add_b_V=False,
        heads=heads, max_logit_elements=max_logit_elements,
    )

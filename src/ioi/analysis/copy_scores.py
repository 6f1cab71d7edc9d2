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
from jaxtyping import Float, Int
from torch import Tensor

from ioi.analysis._common import final_ln_affine, as_index, gather_positions, model_device, run_cache, unembed_bias

__all__ = [
    "COPY_POSITIONS",
    "copy_scores",
    "copy_scores_from_resid",
    "paper_copy_inputs",
    "arena_copy_inputs",
    "check_value_biases",
    "copy_score_definition",
]

COPY_POSITIONS = ("IO", "S1", "S2")
RESID_HOOK = "blocks.0.hook_resid_post"
# Logits materialised per chunk: 2**22 floats (16 MiB, ~80 samples of GPT-2's vocabulary). Small
# enough that the rank comparison reads them from cache: ~2x faster on CPU than 256 MiB chunks.
DEFAULT_MAX_LOGIT_ELEMENTS = 2**22

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
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
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
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
) -> dict[bool, Float[Tensor, "n_layers n_heads"]]:
    """:func:`copy_scores_from_resid` for each ``negative`` in ``signs`` (``{negative: scores}``).

    Negating the value negates the head's centred output and keeps its norm, so both signs share
    one product: logits = ±P + c with P = (v @ M) / sigma (see below), computed once per chunk.
    """
    device = model_device(model)
    name_ids = as_index(name_ids, device)
    if resid.shape[0] != name_ids.shape[0]:
        raise ValueError(f"{resid.shape[0]} residual samples but {name_ids.shape[0]} name ids.")
    selected = _select_heads(model, heads)
    layer_idx = torch.tensor([layer for layer, _ in selected], device=device)
    head_idx = torch.tensor([head for _, head in selected], device=device)
    W_V = model.W_V[layer_idx, head_idx]  # [K, d_model, d_head]
    b_V = model.b_V[layer_idx, head_idx]  # [K, d_head]
    W_O = model.W_O[layer_idx, head_idx]  # [K, d_head, d_model]
    W_U, b_U = model.W_U, unembed_bias(model)

    # Block 1's ln1 as the paper code; a 1-layer model falls back to block 0's (identical
    # normalisation once LN weights are folded).
    ln_layer = min(ln_layer, model.cfg.n_layers - 1)
    x = model.blocks[ln_layer].ln1(resid) if ln1_normalise else resid
    n_samples = x.shape[0]
    # ln_final(out) @ W_U + b_U, factored through the head's d_head-dimensional value space:
    # out = v @ W_O, so its centred version is v @ W_O_c (W_O with each row centred over d_model),
    # ln_final(out) = (v @ W_O_c) * gamma / sigma + beta with sigma = sqrt(mean(out_c^2) + eps), and
    # logits = (v @ M) / sigma + c with M = (W_O_c * gamma) @ W_U and c = beta @ W_U + b_U.
    # Exact algebra; ~12x fewer FLOPs than unembedding each d_model vector. The negative score
    # negates v, hence P = (v @ M) / sigma, with sigma unchanged.
    gamma, beta = final_ln_affine(model)
    eps = float(getattr(model.cfg, "eps", 1e-5))
    W_O_c = W_O - W_O.mean(-1, keepdim=True)  # [K, d_head, d_model]
    const = beta @ W_U + b_U  # [vocab]
    chunk = max(1, max_logit_elements // max(1, W_U.shape[1]))
    signs = tuple(dict.fromkeys(bool(s) for s in signs))
    hits = {negative: torch.zeros(len(selected), device=device) for negative in signs}
    for index in range(len(selected)):
        v_all = x @ W_V[index]
        if add_b_V:
            v_all = v_all + b_V[index]
        out_c = v_all @ W_O_c[index]  # [s, d_model]
        sigma = (out_c.pow(2).mean(-1) + eps).sqrt()  # [s]
        M = (W_O_c[index] * gamma) @ W_U  # [d_head, vocab]
        v_scaled = v_all / sigma[:, None]
        for start in range(0, n_samples, chunk):
            stop = start + chunk
            product = v_scaled[start:stop] @ M
            for negative in signs:
                logits = const - product if negative else product + const
                own = logits.gather(-1, name_ids[start:stop, None])
                rank = (logits > own).sum(-1)  # tokens strictly above the sample's own name
                hits[negative][index] += (rank < k).float().sum()
                del logits
            del product

    out = {}
    for negative in signs:
        scores = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"), device=device)
        scores[layer_idx, head_idx] = hits[negative] / max(1, n_samples)
        out[negative] = scores
    return out


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
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
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

"""Head validation on repeated random tokens (paper App. H/I, Figs. 17-18; the paper code's
early-head checks).

A sequence is ``seq_len`` uniformly random tokens followed by the same ``seq_len`` tokens again
(token ids in ``[vocab_range[0], vocab_range[1])``, as the paper code's ``randint(1000, 10000)``),
by default **without** BOS like every number in the paper; ``prepend_bos=True`` adds one BOS
(id 50256) in front, and the scores then skip it (positions below are relative to the first random
token, ``b`` = 0 or 1 = the BOS offset, ``T = 2 * seq_len``).

Attention scores (mean post-softmax attention probability over prompts and the query positions
listed), each ``[n_layers, n_heads]``:

* ``previous_token``: query ``i`` -> key ``i - 1`` for every ``1 <= i < T`` (Fig. 18 centre);
* ``duplicate_token``: query ``i`` -> key ``i - seq_len`` (the token's previous occurrence) for
  ``i`` in the second half ``seq_len <= i < T`` (Fig. 18 left);
* ``induction``: query ``i`` -> key ``i - seq_len + 1`` (the token after the previous occurrence)
  for ``i`` in the second half (Fig. 18 right).

Copying score (Fig. 17): ``next_token_contribution[l, h]`` = mean over prompts and second-half
positions ``seq_len <= i < T - 1`` of ``<z[i, h] @ W_O[l, h], W_U[:, token[i + 1]]>`` -- a **raw**
dot product (no final LayerNorm, no ``b_O``; ``z`` includes ``b_V`` when value biases are not
folded), as in the paper.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi.analysis._common import model_device, run_cache
from ioi.tokenizer import GPT2_EOS_TOKEN_ID

__all__ = ["generate_repeated_tokens", "head_scores", "repeated_token_hook_names", "SCORE_NAMES"]

SCORE_NAMES = ("previous_token", "duplicate_token", "induction", "next_token_contribution")


def generate_repeated_tokens(
    batch: int = 4,
    seq_len: int = 100,
    seed: int = 0,
    vocab_range: tuple[int, int] = (1000, 10000),
    prepend_bos: bool = False,
    bos_token_id: int = GPT2_EOS_TOKEN_ID,
) -> Int[Tensor, "batch total"]:
    """``[batch, 2 * seq_len]`` (``+ 1`` with BOS) random tokens, the first half repeated once.

    Tokens are drawn uniformly from ``[vocab_range[0], vocab_range[1])`` with a private generator
    seeded by ``seed`` (the global RNG is untouched). Default: no BOS, as the paper.
    """
    low, high = vocab_range
    generator = torch.Generator().manual_seed(seed)
    # On the CPU, where the generator is (the same tokens on every device); the caller moves them.
    half = torch.randint(low, high, (batch, seq_len), generator=generator, device="cpu")
    parts = [half, half]
    if prepend_bos:
        parts.insert(0, torch.full((batch, 1), bos_token_id, dtype=half.dtype, device="cpu"))
    return torch.cat(parts, dim=1)


def repeated_token_hook_names(n_layers: int) -> list[str]:
    return [f"blocks.{layer}.attn.hook_{kind}" for layer in range(n_layers) for kind in ("pattern", "z")]


def _bos_offset(tokens: Tensor, seq_len: int) -> int:
    offset = tokens.shape[1] - 2 * seq_len
    if offset not in (0, 1) or seq_len < 2:
        raise ValueError(
            f"tokens of length {tokens.shape[1]} are not 2 * seq_len ({2 * seq_len}) tokens "
            "(+ 1 BOS); pass the seq_len used by generate_repeated_tokens."
        )
    return offset


@torch.inference_mode()
def head_scores(
    model,
    tokens: Int[Tensor, "batch total"],
    seq_len: int,
    *,
    cache=None,
) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
    """Previous-token, duplicate-token, induction and next-token-contribution scores of every head
    (definitions in the module docstring). ``cache``: an existing cache of ``model`` on ``tokens``
    (must hold every layer's ``attn.hook_pattern`` and ``attn.hook_z``); else the model is run."""
    device = model_device(model)
    tokens = torch.as_tensor(tokens).to(device)
    b = _bos_offset(tokens, seq_len)
    total = tokens.shape[1]
    n_layers = model.cfg.n_layers
    if cache is None:
        cache = run_cache(model, tokens, repeated_token_hook_names(n_layers))

    pattern = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(n_layers)])
    # pattern: [layer, batch, head, query, key]; diagonal(-o) holds (query i + o, key i).
    def stripe(offset: int, first_query: int) -> Tensor:
        diag = pattern.diagonal(offset=-offset, dim1=-2, dim2=-1)  # [..., total - offset]
        return diag[..., first_query - offset :].mean(dim=(1, 3))

    scores = {
        "previous_token": stripe(1, b + 1),
        "duplicate_token": stripe(seq_len, b + seq_len),
        "induction": stripe(seq_len - 1, b + seq_len),
    }

    # Next-token contribution: <z[i] @ W_O[h], W_U[:, tok[i + 1]]> for second-half i < total - 1.
    query = torch.arange(b + seq_len, total - 1, device=device)
    next_dirs = model.W_U[:, tokens[:, query + 1]]  # [d_model, batch, pos]
    contribution = torch.empty(n_layers, model.cfg.n_heads, device=device)
    for layer in range(n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][:, query]  # [batch, pos, head, d_head]
        # W_O[h] @ W_U[:, next]: [head, d_head, batch, pos]
        read = torch.einsum("hed,dbp->hebp", model.W_O[layer], next_dirs)
        contribution[layer] = torch.einsum("bphe,hebp->h", z, read) / (z.shape[0] * z.shape[1])
    scores["next_token_contribution"] = contribution
    return scores

"""Attention-probability helpers (seed "Attention Analysis"; paper §3.1-3.2 attention numbers).

``attention_to_positions`` reads the attention probability (``attn.hook_pattern``, post-softmax)
from a per-prompt **query** position (e.g. END) to per-prompt **key** positions (e.g. IO, S1, S2),
for one head or all heads of a layer at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi.analysis._common import as_index, gather_positions, is_cache, run_cache

__all__ = ["attention_to_positions", "top_heads", "pattern_hook_name"]

KeyPositions = Tensor | Sequence[Tensor]


def pattern_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


@torch.inference_mode()
def attention_to_positions(
    cache_or_model,
    toks: Int[Tensor, "batch seq"] | None,
    layer: int,
    head: int | None,
    query_pos: Int[Tensor, "batch"],
    key_positions: Mapping[str, KeyPositions],
) -> dict[str, Float[Tensor, "batch *n_heads"]]:
    """Attention probability from each prompt's ``query_pos`` to each named key position.

    ``cache_or_model``: an activation cache holding ``blocks.{layer}.attn.hook_pattern`` (``toks``
    is then ignored and may be ``None``), or the model (it is run on ``toks``, caching only that
    pattern). ``key_positions`` maps a name to a ``LongTensor[batch]`` of key positions, or to a
    sequence of them whose probabilities are **summed** (e.g. ``{"S": (S1, S2)}`` for END -> S1 + S2).
    Returns name -> ``[batch]`` for one ``head``, or ``[batch, n_heads]`` when ``head is None``.
    """
    name = pattern_hook_name(layer)
    if is_cache(cache_or_model):
        pattern = cache_or_model[name]
    else:
        if toks is None:
            raise ValueError("Pass the tokens when giving a model instead of a cache.")
        pattern = run_cache(cache_or_model, toks, [name])[name]
    # pattern: [batch, head, query, key] -> rows at each prompt's query position: [batch, head, key]
    from_query = gather_positions(pattern.transpose(1, 2), query_pos)
    rows = torch.arange(from_query.shape[0], device=from_query.device)
    out: dict[str, Tensor] = {}
    for key_name, positions in key_positions.items():
        if isinstance(positions, Tensor):
            group = [positions] if positions.ndim == 1 else list(positions)
        elif all(isinstance(p, int) for p in positions):
            group = [torch.tensor(list(positions), device=from_query.device)]
        else:
            group = list(positions)
        total = torch.zeros(from_query.shape[:2], device=from_query.device, dtype=from_query.dtype)
        for pos in group:
            pos = as_index(pos, from_query.device)
            if len(pos) != len(rows):
                raise ValueError(f"Key positions {key_name!r}: {len(pos)} entries for {len(rows)} prompts.")
            total = total + from_query[rows, :, pos]
        out[key_name] = total if head is None else total[:, head]
    return out


def top_heads(
    scores: Float[Tensor, "n_layers n_heads"], k: int, largest: bool = True
) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the largest (or smallest) score, best first."""
    if scores.ndim != 2:
        raise ValueError(f"Expected a [n_layers, n_heads] tensor, got {tuple(scores.shape)}.")
    k = min(k, scores.numel())
    flat = torch.nan_to_num(scores.detach().float().flatten(), nan=-torch.inf if largest else torch.inf)
    idx = torch.topk(flat, k, largest=largest).indices.tolist()
    n_heads = scores.shape[1]
    return [(i // n_heads, i % n_heads) for i in idx]

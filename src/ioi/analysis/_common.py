"""Shared plumbing for :mod:`ioi.analysis`: per-prompt position indexing, caches, final-LN affine.

Every analysis reads activations at *each prompt's own* positions (END, IO, S1, S2, ...), given as
``LongTensor[batch]``; right-padded batches are never read at position ``-1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

# Hooks whose activations have no position axis at dim 1 (attention scores / patterns).
_NO_POSITION_AXIS = ("hook_pattern", "hook_attn_scores")


def model_device(model) -> torch.device:
    """The device of the model's unembedding (all our tensors are moved there)."""
    return model.W_U.device


def as_index(values: Tensor | Iterable[int], device: torch.device | None = None) -> Tensor:
    """A 1-D ``LongTensor`` of indices (positions or token ids) on ``device``."""
    index = torch.as_tensor(values, dtype=torch.long)
    if index.ndim != 1:
        raise ValueError(f"Expected a 1-D tensor of indices (one per prompt), got {tuple(index.shape)}.")
    return index.to(device) if device is not None else index


def gather_positions(
    acts: Float[Tensor, "batch pos *rest"], pos: Int[Tensor, "batch"]
) -> Float[Tensor, "batch *rest"]:
    """``acts[i, pos[i]]`` for every prompt ``i`` (per-prompt position, e.g. END)."""
    pos = as_index(pos)
    if pos.shape[0] != acts.shape[0]:
        raise ValueError(
            f"{pos.shape[0]} positions for a batch of {acts.shape[0]} prompts: pass one position "
            "per prompt of the batch the activations were computed on."
        )
    if pos.numel():
        # Checked where the positions are (a dataset's are on the CPU: no device sync), in one read.
        low, high = torch.stack(torch.aminmax(pos)).tolist()
        if high >= acts.shape[1] or low < 0:
            raise ValueError(f"Positions {low}..{high} fall outside the {acts.shape[1]} sequence positions.")
    pos = pos.to(acts.device)
    rows = torch.arange(acts.shape[0], device=acts.device)
    return acts[rows, pos]


def is_cache(obj) -> bool:
    """Whether ``obj`` is an activation cache (TransformerLens ``ActivationCache`` or a dict)."""
    return isinstance(obj, (ActivationCache, Mapping))


def run_cache(model, toks: Int[Tensor, "batch seq"], names: Iterable[str]) -> dict[str, Tensor]:
    """Run ``model`` on ``toks`` caching only ``names``; the pass stops once they have all fired
    (:func:`ioi.forward.cache_activations`)."""
    from ioi.forward import cache_activations

    toks = torch.as_tensor(toks).to(model_device(model))
    return cache_activations(model, toks, list(dict.fromkeys(names)))


def require_hooks(cache, names: Iterable[str]) -> None:
    """Raise a helpful error if ``cache`` lacks any of ``names``."""
    keys = set(cache.keys())
    missing = [name for name in names if name not in keys]
    if missing:
        raise KeyError(
            f"The cache lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}: run the model with "
            "run_with_cache (no names_filter, or one including these hooks), or pass the tokens "
            "instead of a cache."
        )


def cache_at_positions(model, cache, pos: Int[Tensor, "batch"], names: Iterable[str]) -> ActivationCache:
    """A new ``ActivationCache`` holding ``names`` gathered at each prompt's ``pos`` (kept as a
    position axis of length 1), so TransformerLens' cache helpers (``accumulated_resid``,
    ``decompose_resid``, ``stack_head_results``, ``apply_ln_to_stack``) work per prompt at e.g. END
    without materialising every position of every component."""
    names = list(names)
    require_hooks(cache, names)
    gathered = {}
    for name in names:
        if name.endswith(_NO_POSITION_AXIS):
            raise ValueError(f"{name} has no position axis at dim 1; it cannot be gathered.")
        gathered[name] = gather_positions(cache[name], pos)[:, None]
    return ActivationCache(gathered, model)


def final_ln_affine(model) -> tuple[Float[Tensor, "d_model"], Float[Tensor, "d_model"]]:
    """``ln_final``'s weight and bias (ones and zeros once ``fold_ln`` has folded them into W_U)."""
    d_model = model.cfg.d_model
    device = model_device(model)
    ln = getattr(model, "ln_final", None)
    module = getattr(ln, "_original_component", ln)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    weight = torch.ones(d_model, device=device) if weight is None else weight.detach().float()
    bias = torch.zeros(d_model, device=device) if bias is None else bias.detach().float()
    return weight, bias


def unembed_bias(model) -> Float[Tensor, "d_vocab"]:
    """``b_U`` (zeros if the model has none)."""
    b_U = getattr(model, "b_U", None)
    if b_U is None:
        return torch.zeros(model.W_U.shape[1], device=model_device(model))
    return b_U


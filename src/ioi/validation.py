"""Input checks shared by the entry points (patching, ablation, forward passes).

Token tensors that are not integer ids in the model's vocabulary would otherwise reach the
embedding as a raw torch ``IndexError`` / ``RuntimeError`` deep inside a sweep; these checks fail
first, with the fix.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor


def check_tokens(model, tokens: Any, name: str = "tokens", *, ndim: int = 2) -> Int[Tensor, "batch seq"]:
    """``tokens`` as a ``[batch, seq]`` integer tensor on the model's device, after checking that
    it is one and that every id lies in ``[0, model.cfg.d_vocab)``.

    Raises:
        TypeError: not a tensor/array of integers (floats, bools, strings).
        ValueError: wrong number of dimensions, empty, or ids outside the vocabulary.
    """
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
        raise TypeError(f"{name} must be token ids, not text: tokenize first (model.to_tokens(text) or "
                        "IOIDataset(...).toks).")
    try:
        tokens = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a [batch, seq] tensor of token ids; got {type(tokens).__name__} "
                        f"({err}).") from None
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"{name} must hold integer token ids (torch.long); got dtype {tokens.dtype}. "
                        f"Pass the tokenizer's ids (e.g. IOIDataset(...).toks), or convert exactly "
                        f"integer-valued ids with {name}.long().")
    if tokens.ndim != ndim:
        raise ValueError(f"{name} must be a [batch, seq] tensor of token ids; got shape {tuple(tokens.shape)}"
                         + (" (add a batch axis: tokens[None])" if tokens.ndim == ndim - 1 else "") + ".")
    if tokens.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)}): it needs at least one prompt "
                         "of at least one token.")
    d_vocab = int(model.cfg.d_vocab)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= d_vocab:
        bad = tokens[(tokens < 0) | (tokens >= d_vocab)]
        raise ValueError(
            f"{name} holds ids outside the model's vocabulary [0, {d_vocab}): "
            f"{sorted(set(bad.flatten().tolist()))[:5]} (min {low}, max {high}). Tokenize with this "
            f"model's tokenizer (GPT-2's for every model here) and pad with a valid id (GPT-2: "
            f"50256), not -1."
        )
    device = model.W_U.device
    return tokens.to(device=device, dtype=torch.long) if tokens.dtype != torch.long or tokens.device != device \
        else tokens

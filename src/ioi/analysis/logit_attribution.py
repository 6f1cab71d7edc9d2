"""Direct logit attribution (DLA) and the logit lens for the IOI logit difference, read at END.

Definitions (seed notebook "Logit Attribution"; paper §3.1), all at each prompt's own END position
``end_idx[i]`` (never position -1 of a right-padded batch):

* **answer direction** ``d_i = W_U[:, IO_i] - W_U[:, S_i]`` (``[batch, d_model]``); the model's logit
  difference is ``LD_i = <LN_final(x_i), d_i> + b_U[IO_i] - b_U[S_i]`` where ``x_i`` is the final
  residual stream at END.
* **Final-LN convention** (TransformerLens ``apply_ln_to_stack``): a residual *component* ``c`` is
  mapped to ``(c - mean_d(c)) / scale_i`` where ``scale_i`` is the **cached** ``ln_final`` scale of the
  real forward pass at END (``ln_final.hook_scale``). The map is linear, so components add up exactly
  to the model's LD. With ``fold_ln=True`` (our default) ``ln_final`` has unit weight and zero bias;
  otherwise its weight multiplies ``d_i`` and its bias joins the constant term.
* **Constant term** ("b_U"): ``b_U[IO] - b_U[S]`` (+ ``<ln_final.b, d_i>`` if LN is not folded);
  zero for GPT-2, whose unembedding has no bias.
* **Per-head outputs** are ``z[END, h] @ W_O[h]`` **without** ``b_O`` (the per-layer ``b_O`` terms are
  returned separately by :func:`dla_attn_bias`). ``z`` includes the head's ``b_V`` when the model was
  loaded with ``fold_value_biases=False`` (our default): each head's output then contains its own
  ``b_V @ W_O[h]``; with folding that constant sits in ``b_O`` instead.

Each function takes either an ``ActivationCache`` from ``model.run_with_cache(toks)`` (it needs the
residual, ``attn_out``/``mlp_out``, ``attn.hook_z`` and ``ln_final.hook_scale`` hooks) or the tokens
themselves (the model is then run caching only those hooks). Means are over prompts; with
``per_prompt=True`` the prompt axis is kept last.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi.analysis._common import (
    as_index,
    cache_at_positions,
    final_ln_affine,
    is_cache,
    model_device,
    run_cache,
    unembed_bias,
)
from ioi.analysis.attention import attention_to_positions, top_heads  # noqa: F401  (re-exported)

__all__ = [
    "answer_residual_directions",
    "logit_lens",
    "dla_per_layer",
    "dla_per_head",
    "dla_attn_bias",
    "residual_hook_names",
    "attention_to_positions",
    "top_heads",
]

BIAS_LABEL = "b_U"


def residual_hook_names(n_layers: int) -> list[str]:
    """Every hook the DLA / logit-lens functions read (gathered at END)."""
    names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale"]
    for layer in range(n_layers):
        names += [
            f"blocks.{layer}.hook_resid_pre",
            f"blocks.{layer}.hook_resid_mid",
            f"blocks.{layer}.hook_resid_post",
            f"blocks.{layer}.hook_attn_out",
            f"blocks.{layer}.hook_mlp_out",
            f"blocks.{layer}.attn.hook_z",
        ]
    return names


@torch.inference_mode()
def answer_residual_directions(
    model, io_ids: Int[Tensor, "batch"], s_ids: Int[Tensor, "batch"]
) -> Float[Tensor, "batch d_model"]:
    """The logit-difference direction ``W_U[:, IO_i] - W_U[:, S_i]`` of each prompt."""
    device = model_device(model)
    W_U = model.W_U
    return (W_U[:, as_index(io_ids, device)] - W_U[:, as_index(s_ids, device)]).T


def _end_setup(model, cache_or_toks, end_idx, io_ids, s_ids):
    """(cache gathered at END, effective direction [batch, d_model], constant [batch])."""
    device = model_device(model)
    end_idx = as_index(end_idx, device)
    io_ids, s_ids = as_index(io_ids, device), as_index(s_ids, device)
    if not (len(end_idx) == len(io_ids) == len(s_ids)):
        raise ValueError("end_idx, io_ids and s_ids need one entry per prompt.")
    names = residual_hook_names(model.cfg.n_layers)
    cache = cache_or_toks if is_cache(cache_or_toks) else run_cache(model, cache_or_toks, names)
    end_cache = cache_at_positions(model, cache, end_idx, names)
    direction = answer_residual_directions(model, io_ids, s_ids)
    ln_w, ln_b = final_ln_affine(model)
    b_U = unembed_bias(model)
    constant = direction @ ln_b + b_U[io_ids] - b_U[s_ids]
    return end_cache, direction * ln_w, constant


def _project(
    stack_ln: Float[Tensor, "component batch 1 d_model"], direction: Float[Tensor, "batch d_model"]
) -> Float[Tensor, "component batch"]:
    return einops.einsum(stack_ln[:, :, 0].float(), direction.float(), "c batch d, batch d -> c batch")


def _reduce(values: Float[Tensor, "... batch"], per_prompt: bool) -> Tensor:
    return values if per_prompt else values.mean(-1)


@torch.inference_mode()
def logit_lens(
    model,
    cache_or_toks,
    end_idx: Int[Tensor, "batch"],
    io_ids: Int[Tensor, "batch"],
    s_ids: Int[Tensor, "batch"],
    *,
    per_prompt: bool = False,
    recompute_ln: bool = False,
    include_bias: bool = True,
) -> tuple[Float[Tensor, "component *batch"], list[str]]:
    """Logit difference read off the accumulated residual stream at END (the seed's logit lens).

    Components (``cache.accumulated_resid(layer=-1, incl_mid=True)``): ``"{l}_pre"`` (the residual
    entering block ``l``; ``"0_pre"`` = token + positional embedding), ``"{l}_mid"`` (after block
    ``l``'s attention) and ``"final_post"`` (the final residual stream). Each is passed through
    ``ln_final`` with the **cached** final-LN scale of the real run at END (``recompute_ln=False``,
    as ``apply_ln_to_stack`` / the seed) or with its own statistics (``recompute_ln=True``, the
    "proper" logit lens), dotted with ``W_U[:, IO] - W_U[:, S]``; the constant ``b_U[IO] - b_U[S]``
    is added to every value when ``include_bias``. So the last value equals the model's LD.

    Returns (values ``[n_components]``, or ``[n_components, batch]`` if ``per_prompt``; labels).
    """
    end_cache, direction, constant = _end_setup(model, cache_or_toks, end_idx, io_ids, s_ids)
    stack, labels = end_cache.accumulated_resid(layer=-1, incl_mid=True, return_labels=True)
    if recompute_ln:
        centred = stack - stack.mean(-1, keepdim=True)
        eps = getattr(model.cfg, "eps", 1e-5)
        stack_ln = centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    else:
        stack_ln = end_cache.apply_ln_to_stack(stack, layer=-1)
    values = _project(stack_ln, direction)
    if include_bias:
        values = values + constant
    return _reduce(values, per_prompt), list(labels)


@torch.inference_mode()
def dla_per_layer(
    model,
    cache_or_toks,
    end_idx: Int[Tensor, "batch"],
    io_ids: Int[Tensor, "batch"],
    s_ids: Int[Tensor, "batch"],
    *,
    per_prompt: bool = False,
    include_bias: bool = True,
) -> tuple[Float[Tensor, "component *batch"], list[str]]:
    """Direct contribution of each residual component to the logit difference at END.

    Components (``cache.decompose_resid(layer=-1)``): ``"embed"``, ``"pos_embed"``, then
    ``"{l}_attn_out"`` (includes ``b_O``) and ``"{l}_mlp_out"`` (includes ``b_out``) for each layer,
    and, when ``include_bias``, a last ``"b_U"`` component (``b_U[IO] - b_U[S]``). Each residual
    component goes through the final LN with the cached scale at END. The components sum exactly
    (float error) to the model's LD at END.

    Returns (values ``[n_components]`` or ``[n_components, batch]``; labels).
    """
    end_cache, direction, constant = _end_setup(model, cache_or_toks, end_idx, io_ids, s_ids)
    stack, labels = end_cache.decompose_resid(layer=-1, return_labels=True)
    values = _project(end_cache.apply_ln_to_stack(stack, layer=-1), direction)
    labels = list(labels)
    if include_bias:
        values = torch.cat([values, constant[None]], dim=0)
        labels.append(BIAS_LABEL)
    return _reduce(values, per_prompt), labels


@torch.inference_mode()
def dla_per_head(
    model,
    cache_or_toks,
    end_idx: Int[Tensor, "batch"],
    io_ids: Int[Tensor, "batch"],
    s_ids: Int[Tensor, "batch"],
    *,
    per_prompt: bool = False,
) -> Float[Tensor, "n_layers n_heads *batch"]:
    """Direct contribution of each head's output at END to the logit difference.

    Head output = ``z[END, h] @ W_O[h]`` **excluding** ``b_O`` (``cache.stack_head_results``),
    through the final LN with the cached scale at END, dotted with ``W_U[:, IO] - W_U[:, S]``.
    Summed over a layer's heads, plus :func:`dla_attn_bias` for that layer, it equals the layer's
    ``attn_out`` component of :func:`dla_per_layer`.
    """
    end_cache, direction, _ = _end_setup(model, cache_or_toks, end_idx, io_ids, s_ids)
    stack = end_cache.stack_head_results(layer=-1, apply_ln=True)
    values = einops.rearrange(
        _project(stack, direction), "(layer head) batch -> layer head batch", layer=model.cfg.n_layers
    )
    return _reduce(values, per_prompt)


@torch.inference_mode()
def dla_attn_bias(
    model,
    cache_or_toks,
    end_idx: Int[Tensor, "batch"],
    io_ids: Int[Tensor, "batch"],
    s_ids: Int[Tensor, "batch"],
    *,
    per_prompt: bool = False,
) -> Float[Tensor, "n_layers *batch"]:
    """Direct contribution of each layer's attention output bias ``b_O[l]`` (through the final LN
    with the cached scale at END) to the logit difference; ``[n_layers]`` or ``[n_layers, batch]``."""
    end_cache, direction, _ = _end_setup(model, cache_or_toks, end_idx, io_ids, s_ids)
    batch = direction.shape[0]
    b_O = model.b_O.float()  # [n_layers, d_model]
    stack = b_O[:, None, None, :].expand(-1, batch, 1, -1)
    values = _project(end_cache.apply_ln_to_stack(stack, layer=-1), direction)
    return _reduce(values, per_prompt)

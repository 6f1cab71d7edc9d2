"""Attention vs. name-direction write of a head (paper Fig. 3c and Fig. 16; [C]
``scatter_attention_and_contribution``).

For a head ``(l, h)`` and each prompt ``i``, at the prompt's END position:

* ``attention`` (IO row): attention probability END -> IO; (S row): END -> S1 **plus** END -> S2;
* ``projection`` (IO row): ``<z[END, h] @ W_O[l, h], W_U[:, IO_i]>``; (S row): the same with
  ``W_U[:, S_i]``. Raw dot products: **no final LayerNorm** (paper footnote 1), no ``b_O``; ``z``
  includes the head's ``b_V`` when value biases are not folded. The values depend on weight
  processing (``center_unembed``, ``center_writing_weights``); correlations and signs are what
  compare with the paper ("rho > 0.81, N = 500" for a Name Mover).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ioi.analysis._common import as_index, gather_positions, is_cache, model_device, run_cache

__all__ = ["attention_projection_frame", "scatter_correlations", "SCATTER_COLUMNS"]

SCATTER_COLUMNS = ["layer", "head", "prompt", "name_kind", "attention", "projection"]


def _as_head_list(heads) -> list[tuple[int, int]]:
    if len(heads) == 2 and all(isinstance(x, (int, np.integer)) for x in heads):
        return [(int(heads[0]), int(heads[1]))]
    return [(int(layer), int(head)) for layer, head in heads]


@torch.inference_mode()
def attention_projection_frame(
    model,
    cache_or_toks,
    heads: tuple[int, int] | Sequence[tuple[int, int]],
    end_idx: Int[Tensor, "batch"],
    io_pos: Int[Tensor, "batch"],
    s1_pos: Int[Tensor, "batch"],
    s2_pos: Int[Tensor, "batch"],
    io_ids: Int[Tensor, "batch"],
    s_ids: Int[Tensor, "batch"],
) -> pd.DataFrame:
    """Tidy per-prompt table for the Fig. 3c / 16 scatter of one head (``(layer, head)``) or several.

    Columns: ``layer``, ``head``, ``prompt`` (row index in the batch), ``name_kind`` (``"IO"`` or
    ``"S"``), ``attention`` (END -> IO, or END -> S1 + END -> S2), ``projection`` (raw dot product
    of the head's END output with ``W_U[:, name]``). Two rows per prompt and head.
    """
    head_list = _as_head_list(heads)
    layers = sorted({layer for layer, _ in head_list})
    device = model_device(model)
    if is_cache(cache_or_toks):
        cache = cache_or_toks
    else:
        names = [f"blocks.{l}.attn.hook_{k}" for l in layers for k in ("pattern", "z")]
        cache = run_cache(model, cache_or_toks, names)
    end_idx, io_pos, s1_pos, s2_pos, io_ids, s_ids = (
        as_index(t, device) for t in (end_idx, io_pos, s1_pos, s2_pos, io_ids, s_ids)
    )
    batch = len(end_idx)
    rows = torch.arange(batch, device=device)
    W_U = model.W_U
    u_io, u_s = W_U[:, io_ids].T, W_U[:, s_ids].T  # [batch, d_model]

    per_head = []  # (layer, head, attention [2 * batch], projection [2 * batch]) on the model's device
    for layer in layers:
        # All heads of the layer at once.
        pattern = gather_positions(cache[f"blocks.{layer}.attn.hook_pattern"].transpose(1, 2), end_idx)
        att_io = pattern[rows, :, io_pos]  # [batch, head]
        att_s = pattern[rows, :, s1_pos] + pattern[rows, :, s2_pos]
        z = gather_positions(cache[f"blocks.{layer}.attn.hook_z"], end_idx)  # [batch, head, d_head]
        out = torch.einsum("bhe,hed->bhd", z, model.W_O[layer])  # [batch, head, d_model]
        proj_io = torch.einsum("bhd,bd->bh", out, u_io)
        proj_s = torch.einsum("bhd,bd->bh", out, u_s)
        for head in [h for l, h in head_list if l == layer]:
            per_head.append((layer, head, torch.stack([att_io[:, head], att_s[:, head]], 1).flatten(),
                             torch.stack([proj_io[:, head], proj_s[:, head]], 1).flatten()))
    # One device -> host copy for every head: [head, 2 (attention, projection), 2 * batch].
    values = torch.stack([torch.stack([att, proj]) for _, _, att, proj in per_head]).double().cpu().numpy()
    frames = [
        pd.DataFrame(
            {
                "layer": layer,
                "head": head,
                "prompt": np.repeat(np.arange(batch), 2),
                "name_kind": np.tile(["IO", "S"], batch),
                "attention": values[i, 0],
                "projection": values[i, 1],
            }
        )
        for i, (layer, head, _, _) in enumerate(per_head)
    ]
    order = {head: i for i, head in enumerate(head_list)}
    frames.sort(key=lambda f: order[(int(f["layer"].iloc[0]), int(f["head"].iloc[0]))])
    return pd.concat(frames, ignore_index=True)[SCATTER_COLUMNS]


def scatter_correlations(frame: pd.DataFrame) -> pd.DataFrame:
    """Pearson correlation of ``attention`` with ``projection``, per head, for the IO rows, the S
    rows and all rows pooled (the paper's rho). Columns: ``layer, head, name_kind, pearson_r, n``
    (``name_kind`` in ``{"IO", "S", "pooled"}``; NaN where a column is constant)."""
    records = []
    for (layer, head), group in frame.groupby(["layer", "head"], sort=False):
        subsets = [("IO", group[group.name_kind == "IO"]), ("S", group[group.name_kind == "S"])]
        subsets.append(("pooled", group))
        for kind, sub in subsets:
            a, p = sub["attention"].to_numpy(float), sub["projection"].to_numpy(float)
            if len(sub) < 2 or a.std() == 0 or p.std() == 0:
                r = float("nan")
            else:
                r = float(np.corrcoef(a, p)[0, 1])
            records.append({"layer": layer, "head": head, "name_kind": kind, "pearson_r": r, "n": len(sub)})
    return pd.DataFrame.from_records(records)

"""The seed notebook's activation patching figures, on the IOI dataset.

Definition (denoising, as the seed and ``transformer_lens.patching``): run the model on the
corrupted prompts and patch in ONE clean activation at a time (a residual stream slot, a block's
attention or MLP output, or a head's output / query / key / value / pattern); the cell is the
normalised logit difference of the patched run, ``(LD - LD_corrupted) / (LD_clean - LD_corrupted)``
(0 = corrupted performance, 1 = clean), with LD measured with the clean prompts' IO and S tokens.

* Clean prompts: p_IOI (``ctx.ioi``). Corrupted prompts: the same prompts with S2 replaced by IO
  (the paper code's flip ``("S2", "IO")``), the dataset version of the seed's swap of each prompt
  with its partner of opposite answer.
* Positions: prompts of different templates do not share absolute positions, so the position axis
  of the per-position figures is the per-prompt named positions IO, S1, S1+1, S2, END (each cell
  patches every prompt at its own position of that name). Patching at any other position cannot
  move the clean/corrupted difference except through these tokens (S2 is the only token that differs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

import ioi.patching as patching
from ioi.experiments.attribution import circuit_summary, per_head_dict
from ioi.experiments.core import ExperimentResult, RunContext, end_logits_batched
from ioi.metrics import LogitDiff

POSITION_NAMES = ("IO", "S1", "S1+1", "S2", "END")
BLOCK_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")
HEAD_COMPONENTS = ("output", "query", "key", "value", "pattern")
CORRUPTION = ("S2", "IO")


def _setup(model, ctx: RunContext) -> tuple[Any, Any, LogitDiff, dict[str, float]]:
    clean = ctx.ioi
    corrupted = clean.gen_flipped_prompts(CORRUPTION)
    raw = LogitDiff.from_dataset(clean)
    end = clean.word_idx["END"]
    clean_ld = float(raw.from_end_logits(end_logits_batched(model, clean.toks, end,
                                                            memory_budget_mb=ctx.memory_budget_mb)))
    corrupted_ld = float(raw.from_end_logits(end_logits_batched(model, corrupted.toks, end,
                                                                memory_budget_mb=ctx.memory_budget_mb)))
    metric = raw.with_baselines(clean_ld, corrupted_ld, normalisation="clean_is_one")
    baselines = {"clean_logit_diff": clean_ld, "corrupted_logit_diff": corrupted_ld}
    return clean, corrupted, metric, baselines


def _options(clean, ctx: RunContext) -> dict[str, Any]:
    return {"clean_tokens": clean.toks, "memory_budget_mb": ctx.memory_budget_mb, "progress": ctx.progress}


def _named_positions(dataset) -> dict[str, torch.Tensor]:
    return {name: dataset.word_idx[name] for name in POSITION_NAMES}


def _base_summary(model, ctx: RunContext, baselines: dict[str, float]) -> dict[str, Any]:
    return {
        "n_layers": model.cfg.n_layers,
        "n_heads": model.cfg.n_heads,
        "positions": list(POSITION_NAMES),
        "corruption": "S2 replaced by IO (flip ('S2', 'IO'))",
        "metric": "(LD - LD_corrupted) / (LD_clean - LD_corrupted)",
        "circuit": circuit_summary(ctx.circuit) if _circuit_fits(model, ctx) else {},
        **baselines,
    }


def _circuit_fits(model, ctx: RunContext) -> bool:
    try:
        ctx.circuit.validate(model.cfg.n_layers, model.cfg.n_heads)
    except ValueError:
        return False
    return True


def _layer_pos_frame(grid: np.ndarray, component: str) -> pd.DataFrame:
    layers, positions = np.meshgrid(range(grid.shape[0]), range(grid.shape[1]), indexing="ij")
    return pd.DataFrame({
        "component": component,
        "layer": layers.ravel(),
        "position": [POSITION_NAMES[p] for p in positions.ravel()],
        "value": grid.ravel(),
    })


def _layer_head_frame(grid: np.ndarray, component: str, position: str = "all") -> pd.DataFrame:
    layers, heads = np.meshgrid(range(grid.shape[0]), range(grid.shape[1]), indexing="ij")
    return pd.DataFrame({
        "component": component,
        "position": position,
        "layer": layers.ravel(),
        "head": heads.ravel(),
        "value": grid.ravel(),
    })


def act_patch_resid_pre(model, ctx: RunContext) -> ExperimentResult:
    """Patch the clean ``resid_pre`` of each layer at each named position into the corrupted run."""
    clean, corrupted, metric, baselines = _setup(model, ctx)
    grid = patching.get_act_patch_resid_pre(
        model, corrupted.toks, None, metric, positions=_named_positions(clean), **_options(clean, ctx)
    ).float().cpu().numpy()
    summary = _base_summary(model, ctx, baselines) | {"resid_pre": grid.tolist()}
    return ExperimentResult(_layer_pos_frame(grid, "resid_pre"), summary)


def act_patch_block(model, ctx: RunContext) -> ExperimentResult:
    """Patch, one at a time, each layer's clean ``resid_pre``, ``attn_out`` or ``mlp_out`` at each
    named position into the corrupted run (``get_act_patch_block_every``)."""
    clean, corrupted, metric, baselines = _setup(model, ctx)
    grid = patching.get_act_patch_block_every(
        model, corrupted.toks, None, metric, positions=_named_positions(clean), **_options(clean, ctx)
    ).float().cpu().numpy()
    frame = pd.concat([_layer_pos_frame(grid[i], c) for i, c in enumerate(BLOCK_COMPONENTS)],
                      ignore_index=True)
    summary = _base_summary(model, ctx, baselines) | {
        component: grid[i].tolist() for i, component in enumerate(BLOCK_COMPONENTS)
    }
    return ExperimentResult(frame, summary)


def act_patch_head_out(model, ctx: RunContext) -> ExperimentResult:
    """Patch each head's clean output (``hook_z``) at every position into the corrupted run."""
    clean, corrupted, metric, baselines = _setup(model, ctx)
    grid = patching.get_act_patch_attn_head_out_all_pos(
        model, corrupted.toks, None, metric, **_options(clean, ctx)
    ).float().cpu().numpy()
    summary = _base_summary(model, ctx, baselines) | {"output": per_head_dict(grid)}
    return ExperimentResult(_layer_head_frame(grid, "output"), summary)


def act_patch_head_every(model, ctx: RunContext) -> ExperimentResult:
    """Patch each head's clean output, query, key, value or pattern (one at a time, all positions)."""
    clean, corrupted, metric, baselines = _setup(model, ctx)
    grid = patching.get_act_patch_attn_head_all_pos_every(
        model, corrupted.toks, None, metric, **_options(clean, ctx)
    ).float().cpu().numpy()
    frame = pd.concat([_layer_head_frame(grid[i], c) for i, c in enumerate(HEAD_COMPONENTS)],
                      ignore_index=True)
    summary = _base_summary(model, ctx, baselines) | {
        component: per_head_dict(grid[i]) for i, component in enumerate(HEAD_COMPONENTS)
    }
    return ExperimentResult(frame, summary)


def act_patch_head_by_pos(model, ctx: RunContext) -> ExperimentResult:
    """The by-position version: each head's output / query / key / value / pattern patched at one
    named position at a time (``get_act_patch_attn_head_by_pos_every``)."""
    clean, corrupted, metric, baselines = _setup(model, ctx)
    grid = patching.get_act_patch_attn_head_by_pos_every(
        model, corrupted.toks, None, metric, positions=_named_positions(clean), **_options(clean, ctx)
    ).float().cpu().numpy()  # [component, layer, position, head]
    frames, summary = [], _base_summary(model, ctx, baselines)
    for i, component in enumerate(HEAD_COMPONENTS):
        summary[component] = {}
        for p, position in enumerate(POSITION_NAMES):
            frames.append(_layer_head_frame(grid[i, :, p, :], component, position))
            summary[component][position] = per_head_dict(grid[i, :, p, :])
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary)

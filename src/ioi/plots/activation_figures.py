"""Figures of the seed notebook's activation patching (denoising; 0 = corrupted, 1 = clean)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ioi.plots.attribution import grid_from_dict, outline_legend, outlines
from ioi.plots.common import head_heatmap, model_suptitle, outline_heads, outline_label, paper_panel

CBAR = "normalised LD (1 = clean, 0 = corrupted)"
COMPONENT_TITLES = {
    "resid_pre": "Residual stream (resid_pre)",
    "attn_out": "Attention output",
    "mlp_out": "MLP output",
    "output": "Output (z)",
    "query": "Query",
    "key": "Key",
    "value": "Value",
    "pattern": "Pattern",
}

SEED_RESID_TEXT = (
    "Seed notebook (GPT-2 small): the relevant information sits at S2 in early layers and moves to "
    "END at layers 7-8; patching the residual stream at the right position almost exactly "
    "recovers performance."
)
SEED_BLOCK_TEXT = (
    "Seed notebook: early attention layers matter at S2 and later ones at END; MLPs matter little "
    "except MLP0 (at S2)."
)
SEED_HEAD_TEXT = (
    "Seed notebook: 9.9 large positive, 10.7 large negative; 7.3, 7.9, 8.6, 8.10 (S-inhibition) "
    "matter through their values; 3.0, 5.5, 6.9 through their queries; 9.9, 10.0 through their queries."
)


def _layer_pos_panel(ax, grid, positions, title) -> None:
    grid = np.asarray(grid, dtype=float)
    bound = float(np.nanmax(np.abs(grid))) or 1.0
    image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label(CBAR, fontsize=7)
    ax.set_xticks(range(len(positions)), positions)
    ax.set_yticks(range(grid.shape[0]))
    ax.set_xlabel("Position (per prompt)")
    ax.set_ylabel("Layer")
    ax.set_title(title)


def act_patch_resid_pre(frame, summary, meta):
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    _layer_pos_panel(ax, summary["resid_pre"], summary["positions"], "resid_pre activation patching")
    paper_panel(ax_text, SEED_RESID_TEXT, heading="What the seed notebook shows (GPT-2 small)")
    model_suptitle(fig, "Activation patching of the residual stream (layer x position)", meta)
    return fig


def act_patch_block(frame, summary, meta):
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), gridspec_kw={"width_ratios": [1, 1, 1, 0.9]})
    for ax, component in zip(axes, ("resid_pre", "attn_out", "mlp_out")):
        _layer_pos_panel(ax, summary[component], summary["positions"], COMPONENT_TITLES[component])
    paper_panel(axes[-1], SEED_BLOCK_TEXT, heading="What the seed notebook shows (GPT-2 small)")
    fig.subplots_adjust(wspace=0.55)
    model_suptitle(fig, "Activation patching per block (resid_pre / attn_out / mlp_out)", meta)
    return fig


def _head_panels(axes, summary, components, meta) -> None:
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    outlined = outlines(summary)
    for ax, component in zip(axes, components):
        grid = grid_from_dict(summary[component], n_layers, n_heads)
        head_heatmap(ax, grid, cbar_label=CBAR, outlined=outlined)
        ax.set_title(COMPONENT_TITLES[component])
    outline_legend(axes[0], sorted(set(outlined.values())), outline_label(meta), offset=-0.16)


def act_patch_head_out(frame, summary, meta):
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(9.5, 4.6), gridspec_kw={"width_ratios": [1.3, 1]})
    _head_panels([ax], summary, ["output"], meta)
    paper_panel(ax_text, SEED_HEAD_TEXT, heading="What the seed notebook shows (GPT-2 small)")
    model_suptitle(fig, "Activation patching of each head's output (all positions)", meta)
    return fig


def act_patch_head_every(frame, summary, meta):
    components = ("output", "query", "key", "value", "pattern")
    fig, axes = plt.subplots(1, 6, figsize=(26, 4.4), gridspec_kw={"width_ratios": [1] * 5 + [0.9]})
    _head_panels(axes[:5], summary, components, meta)
    fig.subplots_adjust(wspace=0.45)
    paper_panel(axes[-1], SEED_HEAD_TEXT, heading="What the seed notebook shows (GPT-2 small)")
    model_suptitle(fig, "Activation patching per head: output, query, key, value, pattern "
                             "(all positions)", meta)
    return fig


def act_patch_head_by_pos(frame, summary, meta):
    components = ("output", "query", "key", "value", "pattern")
    positions = summary["positions"]
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    outlined = outlines(summary)
    fig, axes = plt.subplots(len(components), len(positions),
                             figsize=(3.3 * len(positions), 2.9 * len(components)), squeeze=False)
    values = [grid_from_dict(summary[c][p], n_layers, n_heads) for c in components for p in positions]
    bound = float(np.nanmax(np.abs(values))) or 1.0
    for i, component in enumerate(components):
        for j, position in enumerate(positions):
            ax = axes[i, j]
            grid = grid_from_dict(summary[component][position], n_layers, n_heads)
            image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
            outline_heads(ax, outlined, n_layers, n_heads, lw=1.2)
            ax.set_title(f"{COMPONENT_TITLES[component]} @ {position}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks(range(0, n_layers, max(1, n_layers // 6)))
            if j == 0:
                ax.set_ylabel("Layer")
            if i == len(components) - 1:
                ax.set_xlabel("Head")
    fig.colorbar(image, ax=axes, fraction=0.02, pad=0.01).set_label(CBAR)
    model_suptitle(fig, "Activation patching per head, per named position "
                             "(output / query / key / value / pattern)", meta)
    return fig

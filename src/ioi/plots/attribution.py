"""Figures of where the logit difference is written (seed notebook; paper §3.1): logit lens,
per-layer and per-head direct logit attribution, attention patterns of the top DLA heads.

Plotters get ``(frame, summary, meta)`` only; everything they need (labels, model shape, the
circuit's heads by class, token labels) is in the summary written by
:mod:`ioi.experiments.attribution`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch, Rectangle

from ioi.circuits import CLASS_ORDER
from ioi.plots.common import (
    CLASS_COLOURS,
    head_heatmap,
    model_suptitle,
    num,
    outline_label,
    paper_panel,
    sci,
)

Head = tuple[int, int]
SEED_HEADING = "What the seed / paper report (GPT-2 small)"


# ------------------------------------------------------------------------------------------------
# Helpers shared with ioi.plots.heads
# ------------------------------------------------------------------------------------------------


def parse_head(key: str) -> Head:
    layer, head = key.split(".")
    return int(layer), int(head)


def circuit_classes(summary: Mapping) -> dict[str, list[Head]]:
    """``class -> [(layer, head), ...]`` from the summary's ``circuit`` entry, in the circuit's
    class order (summary.json sorts keys alphabetically)."""
    classes = summary.get("circuit", {}).get("classes", {})
    rank = {cls: i for i, cls in enumerate(CLASS_ORDER)}
    order = sorted(classes, key=lambda c: (rank.get(c, len(rank)), c))
    return {cls: [parse_head(k) for k in classes[cls]] for cls in order}


def outlines(summary: Mapping, classes: Iterable[str] | None = None) -> dict[Head, str]:
    """``(layer, head) -> class`` of the circuit's heads (optionally only ``classes``), for
    :func:`ioi.plots.common.head_heatmap`; a head in several classes keeps the first."""
    by_class = circuit_classes(summary)
    wanted = list(by_class) if classes is None else [c for c in classes if c in by_class]
    out: dict[Head, str] = {}
    for cls in wanted:
        for head in by_class[cls]:
            out.setdefault(head, cls)
    return out


def class_lookup(summary: Mapping) -> dict[str, str]:
    """``"layer.head" -> class`` for the circuit's heads."""
    return {f"{l}.{h}": cls for (l, h), cls in outlines(summary).items()}


def grid_from_dict(values: Mapping[str, float | None], n_layers: int, n_heads: int) -> np.ndarray:
    """``{"layer.head": value}`` -> ``[n_layers, n_heads]`` array (missing / None -> NaN)."""
    grid = np.full((n_layers, n_heads), np.nan)
    for key, value in values.items():
        layer, head = parse_head(key)
        if value is not None and layer < n_layers and head < n_heads:
            grid[layer, head] = float(value)
    return grid


def head_list_text(keys: Sequence[str], values: Mapping[str, float | None],
                   fmt: str | Callable[[float], str] = "{:+.2f}") -> str:
    """``"9.9 (+1.23), ..."``; ``fmt`` a format string or a function (e.g. ``common.num``)."""
    show = fmt if callable(fmt) else fmt.format
    return ", ".join(f"{k} ({show(values[k])})" for k in keys if values.get(k) is not None)


def outline_legend(ax, classes: Iterable[str], title: str, *, offset: float = -0.13) -> None:
    """Legend of the outlined classes below ``ax`` (so it never runs into a neighbouring panel)."""
    classes = list(classes)
    if not classes:
        return
    handles = [Rectangle((0, 0), 1, 1, fill=False, lw=2, edgecolor=CLASS_COLOURS.get(c, "black"), label=c)
               for c in classes]
    ax.legend(handles=handles, title=f"outlined: {title}", loc="upper center",
              bbox_to_anchor=(0.5, offset), ncol=min(len(handles), 3), fontsize=7, title_fontsize=7,
              frameon=False)


def annotate_heads(ax, grid: np.ndarray, k: int) -> None:
    """Write ``layer.head`` on the ``k`` cells of largest |value|, black or white for contrast."""
    finite = np.isfinite(grid)
    if not finite.any() or k <= 0 or not ax.images:
        return
    image = ax.images[0]
    n_heads = grid.shape[1]
    for flat in np.argsort(-np.abs(np.where(finite, grid, 0)).ravel())[:k]:
        layer, head = divmod(int(flat), n_heads)
        r, g, b, _ = image.cmap(image.norm(grid[layer, head]))
        colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
        ax.text(head, layer, f"{layer}.{head}", ha="center", va="center", fontsize=6.5, color=colour)


def no_data(ax, text: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)


# ------------------------------------------------------------------------------------------------
# Logit lens
# ------------------------------------------------------------------------------------------------

SEED_LOGIT_LENS_TEXT = (
    "Seed notebook (GPT-2 small, logit lens): the model is 'utterly unable to do the task until "
    "layer 7'; almost all of the work is done between 9_pre and 9_mid, i.e. by the attention "
    "layer 9; the logit difference decreases in the later layers.\n"
    "Paper §2: the model's mean logit difference on p_IOI is 3.56."
)


PAPER_LD = 3.56  # §2: mean logit difference of GPT-2 small on p_IOI


def logit_lens(frame, summary, meta):
    """LD read off the accumulated residual stream at END, per component, with the model's LD."""
    labels = summary["labels"]
    mean = np.array(summary["logit_diff_mean"], dtype=float)
    low, high = (np.array([c[i] if c[i] is not None else np.nan for c in summary["logit_diff_ci"]])
                 for i in (0, 1))
    own = np.array(summary["logit_diff_own_ln_mean"], dtype=float)
    x = np.arange(len(labels))
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.6, 1]})
    ax.fill_between(x, low, high, color="#4c72b0", alpha=0.25, lw=0, label="95% bootstrap CI")
    ax.plot(x, mean, "o-", color="#4c72b0", ms=3.5, label="final LN with the cached END scale (seed)")
    ax.plot(x, own, "s--", color="#999999", ms=2.5, lw=1, label="final LN with each component's own scale")
    model_ld = summary["model_logit_diff_mean"]
    ax.axhline(model_ld, color="#c44e52", ls="--", lw=1.2, label=f"model's LD at END = {model_ld:.3f}")
    ax.axhline(PAPER_LD, color="black", ls=":", lw=1.2, label=f"paper's LD (GPT-2 small) = {PAPER_LD}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("accumulated residual stream at END (n_pre: entering block n; n_mid: after its attention)")
    ax.set_ylabel("logit difference IO − S (logits)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    ours = f"Ours: final component {mean[-1]:.3f} = model LD {model_ld:.3f}."
    paper_panel(ax_text, SEED_LOGIT_LENS_TEXT + "\n\n" + ours, heading=SEED_HEADING)
    model_suptitle(fig, "Logit lens: logit difference from the accumulated residual stream", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Direct logit attribution
# ------------------------------------------------------------------------------------------------

SEED_DLA_LAYER_TEXT = (
    "Seed notebook (GPT-2 small, per-layer attribution): 'only attention layers matter (in both "
    "directions)'; the MLPs' direct effect on the logit difference is small."
)
PAPER_DLA_HEAD_TEXT = (
    "Seed notebook (DLA per head): 9.6 and 9.9 contribute a lot positively; 10.7 a lot negatively, "
    "also somewhat 11.10.\n"
    "Paper §3.1 (Fig. 3b, path patching to the logits): 9.9, 9.6, 10.0 large positive direct "
    "effect (name movers); 10.7, 11.10 negative (negative name movers)."
)

COMPONENT_COLOURS = {"embed": "#8c8c8c", "attn": "#4c72b0", "mlp": "#dd8452", "b_U": "#55a868"}


def _component_kind(label: str) -> str:
    if label.endswith("attn_out"):
        return "attn"
    if label.endswith("mlp_out"):
        return "mlp"
    return "b_U" if label == "b_U" else "embed"


def dla_layer(frame, summary, meta):
    """Direct logit attribution of each residual component at END (sums to the model's LD)."""
    labels = summary["dla_layer_labels"]
    mean = np.array(summary["dla_layer_mean"], dtype=float)
    cis = np.array([[np.nan if v is None else v for v in c] for c in summary["dla_layer_ci"]], dtype=float)
    err = np.abs(np.stack([mean - cis[:, 0], cis[:, 1] - mean]))
    x = np.arange(len(labels))
    kinds = [_component_kind(l) for l in labels]
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.6, 1]})
    ax.bar(x, mean, color=[COMPONENT_COLOURS[k] for k in kinds], yerr=np.nan_to_num(err),
           error_kw=dict(lw=0.8, capsize=1.5))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("residual stream component (final LN with the cached END scale)")
    ax.set_ylabel("direct contribution to logit(IO) − logit(S)")
    handles = [Patch(color=COMPONENT_COLOURS[k], label=name) for k, name in
               (("embed", "embeddings"), ("attn", "attention layer (incl. b_O)"),
                ("mlp", "MLP layer"), ("b_U", "unembedding bias"))]
    ax.legend(handles=handles, fontsize=7, loc="best", title="error bars: 95% bootstrap CI",
              title_fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    total, ld = float(np.nansum(mean)), summary["logit_diff_mean"]
    ours = (f"Ours: components sum to {total:.3f}; model LD {ld:.3f} "
            f"(max per-prompt error {sci(summary['dla_layer_sum_minus_logit_diff_max_abs'])}).")
    paper_panel(ax_text, SEED_DLA_LAYER_TEXT + "\n\n" + ours, heading="What the seed reports (GPT-2 small)")
    model_suptitle(fig, "Direct logit attribution per layer at END", meta)
    return fig


def dla_head(frame, summary, meta):
    """Layer x head heatmap of per-head DLA at END, name movers / negative name movers outlined."""
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    grid = grid_from_dict(summary["dla_head"], n_layers, n_heads)
    classes = ("name mover", "negative name mover", "backup name mover")
    outlined = outlines(summary, classes)
    fig, (ax, ax_text) = plt.subplots(
        1, 2, figsize=(max(9.5, 0.45 * n_heads + 6.5), max(3.8, 0.33 * n_layers + 1.8)),
        gridspec_kw={"width_ratios": [1.5, 1]},
    )
    head_heatmap(ax, grid, cbar_label="direct contribution to logit(IO) − logit(S)", outlined=outlined)
    annotate_heads(ax, grid, min(6, grid.size))
    ax.set_title("Per-head DLA at END (b_O excluded); the 6 largest |values| labelled", fontsize=8)
    outline_legend(ax, [c for c in classes if c in set(outlined.values())], outline_label(meta))
    values = summary["dla_head"]
    ours = ("Ours: top positive " + head_list_text(summary["top_positive_heads"][:3], values)
            + "; top negative " + head_list_text(summary["top_negative_heads"][:3], values) + ".")
    paper_panel(ax_text, PAPER_DLA_HEAD_TEXT + "\n\n" + ours,
                heading=SEED_HEADING)
    model_suptitle(fig, "Direct logit attribution per head", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Attention patterns of the top DLA heads
# ------------------------------------------------------------------------------------------------

SEED_PATTERN_TEXT = (
    "Seed notebook: the heads with the largest positive DLA (9.6, 9.9; paper §3.1 also 10.0: name "
    "movers) attend from END to the IO name; the negative heads (10.7, 11.10: negative name movers) "
    "also attend to IO and write against it. Paper §3.1: mean END→IO attention of the name "
    "movers 0.59."
)
ROLE_COLOUR = "#c44e52"


def attn_patterns(frame, summary, meta):
    """Mean attention pattern (one template) of the 3 most positive and 3 most negative DLA heads."""
    heads = summary["heads"]
    labels = [l.strip() or repr(l) for l in summary["token_labels"]]
    size = len(labels)
    roles = summary["roles"]
    role_positions = set(int(p) for p in roles.values())
    n_cols = 3
    n_rows = max(1, int(np.ceil(len(heads) / n_cols)))
    cell = max(2.8, 0.17 * size + 1.2)
    fig = plt.figure(figsize=(n_cols * cell + 4.4, n_rows * (cell + 0.4) + 0.8), layout="constrained")
    grid = fig.add_gridspec(n_rows, n_cols + 1, width_ratios=[1] * n_cols + [1.15])
    axes = []
    vmax = float(frame["attention"].max()) if len(frame) else 1.0
    image = None
    for index, info in enumerate(heads):
        ax = fig.add_subplot(grid[index // n_cols, index % n_cols])
        axes.append(ax)
        layer, head = parse_head(info["head"])
        rows = frame[(frame["layer"] == layer) & (frame["head"] == head) & (frame["sign"] == info["sign"])]
        matrix = np.full((size, size), np.nan)
        matrix[rows["query"].to_numpy(int), rows["key"].to_numpy(int)] = rows["attention"].to_numpy(float)
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax, aspect="equal")
        ax.set_xticks(range(size))
        ax.set_yticks(range(size))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yticklabels(labels, fontsize=6)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for pos, tick in enumerate(ticks):
                if pos in role_positions:
                    tick.set_color(ROLE_COLOUR)
                    tick.set_fontweight("bold")
        end = int(roles["END"])
        ax.add_patch(Rectangle((-0.5, end - 0.5), size, 1, fill=False, lw=1.2, edgecolor=ROLE_COLOUR))
        cls = info.get("class", "other")
        colour = CLASS_COLOURS.get(cls, "black")
        ax.set_title(f"{info['head']} ({cls}), DLA {num(info['dla'], signed=True)}\nEND→IO {info['end_to_io']:.2f}, "
                     f"END→S1 {info['end_to_s1']:.2f}, END→S2 {info['end_to_s2']:.2f}",
                     fontsize=7.5, color=colour if cls != "other" else "black")
        ax.set_xlabel("key position (attended to)", fontsize=7)
        ax.set_ylabel("query position", fontsize=7)
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_edgecolor("#1b9e77" if info["sign"] == "positive" else "#d95f02")
            spine.set_linewidth(1.6)
    ax_text = fig.add_subplot(grid[:, n_cols])
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, aspect=30).set_label("mean attention probability")
    ours = (f"Template {summary['template']} ({summary['n_prompts_template']} prompts, positions "
            f"aligned), e.g. \"{summary['example_sentence']}\". Top row / green frame: most positive "
            "DLA heads; bottom row / orange frame: most negative. Red labels: IOI positions; red box: "
            "the END query row. Titles are coloured by the circuit class of the head ("
            + outline_label(meta) + ").")
    paper_panel(ax_text, SEED_PATTERN_TEXT + "\n\n" + ours, heading=SEED_HEADING)
    model_suptitle(fig, "Attention patterns of the top positive / negative DLA heads", meta)
    return fig

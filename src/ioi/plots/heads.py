"""Figures of what individual heads do (paper §3.1-3.2, Figs. 3c, 16, 17, 18): attention between
the IOI positions by circuit class, attention vs. write along the names' unembeddings, copy scores,
and head scores on repeated random tokens.

Plotters get ``(frame, summary, meta)`` only; the circuit's heads by class, the model shape and the
paper's reference numbers are in the summaries written by :mod:`ioi.experiments.heads`.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ioi.plots.attribution import (
    annotate_heads,
    circuit_classes,
    class_lookup,
    grid_from_dict,
    no_data,
    outline_legend,
    outlines,
)
from ioi.plots.common import (
    CLASS_COLOURS,
    ci_error_bars,
    head_heatmap,
    model_suptitle,
    outline_label,
    paper_panel,
)

QUANTITY_LABELS = {
    "end_to_io": "END→IO",
    "end_to_s1": "END→S1",
    "end_to_s2": "END→S2",
    "s2_to_s1": "S2→S1",
    "s2_to_s1_plus_1": "S2→S1+1",
}
QUANTITY_COLOURS = {
    "end_to_io": "#1b9e77",
    "end_to_s1": "#a6cee3",
    "end_to_s2": "#7570b3",
    "s2_to_s1": "#e6ab02",
    "s2_to_s1_plus_1": "#e7298a",
}
PAPER_MARK = dict(color="black", lw=2.2)


def _num(value) -> float:
    return np.nan if value is None else float(value)


def _paper_legend_handle(label: str = "paper (GPT-2 small)") -> Line2D:
    return Line2D([], [], label=label, **PAPER_MARK)


# ------------------------------------------------------------------------------------------------
# Attention summary
# ------------------------------------------------------------------------------------------------

PAPER_ATTENTION_TEXT = (
    "Paper §3.1: name movers (9.9, 9.6, 10.0) 'attend strongly to the IO token: the average "
    "attention probability of all heads over p_IOI is 0.59' (END→IO).\n"
    "Paper §3.2: 'S-Inhibition heads preferentially attend to the S2 token (the average attention "
    "from END to S2 was 0.51 over the four heads)' (7.3, 7.9, 8.6, 8.10).\n"
    "§3.3: duplicate token heads attend S2→S1, induction heads S2→S1+1."
)


def attention_summary(frame, summary, meta):
    """Mean attention between the IOI positions per circuit class (bars, 95% CIs) vs the paper's
    0.59 / 0.51, and END→IO of every head."""
    quantities = summary["quantities"]
    class_mean = summary["class_attention"]
    class_ci = summary["class_attention_ci"]
    classes = [c for c in circuit_classes(summary) if c in class_mean]
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    fig = plt.figure(figsize=(16, 4.8))
    grid = fig.add_gridspec(1, 3, width_ratios=[2.2, 1.35, 1.05], wspace=0.35)
    ax = fig.add_subplot(grid[0])
    width = 0.8 / max(1, len(quantities))
    x = np.arange(len(classes))
    for qi, quantity in enumerate(quantities):
        means = np.array([_num(class_mean[c][quantity]) for c in classes])
        err = ci_error_bars(means, [class_ci[c][quantity] for c in classes])
        ax.bar(x + (qi - (len(quantities) - 1) / 2) * width, means, width, yerr=err,
               color=QUANTITY_COLOURS.get(quantity, "grey"), label=QUANTITY_LABELS.get(quantity, quantity),
               error_kw=dict(lw=0.7, capsize=1.2))
    paper = summary.get("paper", {})
    marks = (("name mover", "end_to_io", paper.get("name_mover_attention_io_mean")),
             ("s-inhibition", "end_to_s2", paper.get("s_inhibition_attention_s2_mean")))
    for cls, quantity, value in marks:
        if cls in classes and quantity in quantities and value is not None:
            centre = classes.index(cls) + (quantities.index(quantity) - (len(quantities) - 1) / 2) * width
            ax.plot([centre - width, centre + width], [value, value], **PAPER_MARK)
            ax.annotate(f"paper {value:.2f}", (centre, value), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([textwrap.fill(c, 9) for c in classes])
    ax.set_ylabel("mean attention probability")
    ax.set_xlabel("circuit class (mean over its heads per prompt; 95% bootstrap CI over prompts)")
    ax.set_ylim(0, 1.22)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + [_paper_legend_handle()], fontsize=7, ncol=3, loc="upper right")
    ax.grid(axis="y", alpha=0.3)

    ax_map = fig.add_subplot(grid[1])
    end_io = grid_from_dict(summary["end_to_io"], n_layers, n_heads)
    outlined = outlines(summary, ("name mover", "negative name mover", "backup name mover", "s-inhibition"))
    head_heatmap(ax_map, end_io, cbar_label="attention END→IO", outlined=outlined, symmetric=False,
                 cmap="Greys")
    ax_map.images[0].set_clim(0, max(1e-6, float(np.nanmax(end_io))))
    ax_map.set_title("END→IO attention of every head", fontsize=8)
    outline_legend(ax_map, [c for c in ("name mover", "backup name mover", "negative name mover",
                                        "s-inhibition") if c in set(outlined.values())], outline_label(meta))

    def fmt(key):
        value, interval = summary.get(key), summary.get(f"{key}_ci") or [None, None]
        if value is None:
            return "n/a (class absent)"
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if None not in interval else f"{value:.3f}"

    ours = (f"Ours: name movers END→IO {fmt('name_mover_attention_io_mean')}; S-inhibition END→S2 "
            f"{fmt('s_inhibition_attention_s2_mean')} (95% CI); all heads END→IO "
            f"{summary['all_heads_attention_io_mean']:.3f}.")
    paper_panel(fig.add_subplot(grid[2]), PAPER_ATTENTION_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Attention between the IOI positions by circuit class", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Fig. 3c / Fig. 16: attention vs. projection
# ------------------------------------------------------------------------------------------------

NAME_COLOURS = {"IO": "#1f77b4", "S": "#d62728"}
PAPER_FIG3C_TEXT = (
    "Paper Fig. 3c (§3.1): for a name mover (the paper code plots 9.9), 'higher attention "
    "probability on the IO or S token is correlated with higher output in the direction of the "
    "name (correlation ρ > 0.81, N = 500)'. y = ⟨head output at END, W_U[name]⟩ without the final "
    "layer norm (footnote 1)."
)
PAPER_FIG16_TEXT = (
    "Paper Fig. 16 (App. F): four example backup name movers, 10.10, 10.6, 10.2, 11.2 (GPT-2 "
    "small). 10.10 behaves like a name mover (attention to a name ~ copying it); 10.2 writes IO and "
    "S about equally. No numbers are given."
)


PAPER_RHO = 0.81  # Fig. 3c: correlation of attention and projection, N = 500


def _scatter_panel(ax, rows, key: str, summary, *, small: bool = False) -> None:
    for kind in ("IO", "S"):
        part = rows[rows["name_kind"] == kind]
        ax.scatter(part["attention"], part["projection"], s=6 if small else 10, alpha=0.55,
                   color=NAME_COLOURS[kind], lw=0,
                   label="END→IO vs W_U[IO]" if kind == "IO" else "END→S1+S2 vs W_U[S]")
    rho = summary["correlation"].get(key)
    rho_io, rho_s = summary["correlation_io"].get(key), summary["correlation_s"].get(key)
    cls = class_lookup(summary).get(key, summary.get("head_class", ""))

    def r(value):
        return "n/a" if value is None else f"{value:.2f}"

    title = f"{key} ({cls}): ρ = {r(rho)}" + ("" if small else f"  (IO only {r(rho_io)}, S only {r(rho_s)})"
                                                               f"\npaper (GPT-2, 9.9): ρ > {PAPER_RHO}")
    ax.set_title(title, fontsize=7.5 if small else 9)
    ax.set_xlabel("attention probability from END", fontsize=7 if small else 9)
    ax.set_ylabel("⟨head output, W_U[name]⟩ (raw)", fontsize=7 if small else 9)
    ax.axhline(0, color="black", lw=0.5)
    ax.grid(alpha=0.3)
    if small:
        ax.tick_params(labelsize=6.5)


def _heads_frame(frame, key: str):
    layer, head = (int(v) for v in key.split("."))
    return frame[(frame["layer"] == layer) & (frame["head"] == head)]


def fig3c(frame, summary, meta):
    """Fig. 3c: attention vs. projection, large for the first name mover, small for the others."""
    heads = summary["heads"]
    n_small = max(1, len(heads) - 1)
    fig = plt.figure(figsize=(13, max(4.6, 2.3 * n_small)))
    grid = fig.add_gridspec(n_small, 3, width_ratios=[1.8, 1.0, 1.1], wspace=0.38, hspace=0.7)
    ax_main = fig.add_subplot(grid[:, 0])
    if not heads:
        no_data(ax_main, "The circuit has no name movers.")
    else:
        _scatter_panel(ax_main, _heads_frame(frame, heads[0]), heads[0], summary)
        ax_main.legend(fontsize=7, loc="upper left", markerscale=2)
        for index, key in enumerate(heads[1:]):
            ax = fig.add_subplot(grid[index, 1])
            _scatter_panel(ax, _heads_frame(frame, key), key, summary, small=True)
    minimum = summary.get("correlation_min_over_name_movers")
    plotted = summary.get("plotted_head") or (heads[0] if heads else None)
    rhos = ", ".join(f"{k}: {'n/a' if summary['correlation'].get(k) is None else format(summary['correlation'][k], '.3f')}"
                     for k in heads)
    ours = (f"Ours (N = {summary['n_prompts']} prompts, two points each): ρ of the plotted head "
            f"{plotted} (the paper's claim) and the others: {rhos}; smallest "
            f"{'n/a' if minimum is None else f'{minimum:.3f}'}.")
    paper_panel(fig.add_subplot(grid[:, 2]), PAPER_FIG3C_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Fig. 3c: name movers copy what they attend to", meta)
    return fig


def fig16(frame, summary, meta):
    """Fig. 16: attention vs. projection for 4 backup name movers (or the stated substitute)."""
    heads = summary["heads"]
    cls = summary.get("head_class", "backup name mover")
    substituted = cls != "backup name mover"
    fig = plt.figure(figsize=(13, 6.2))
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 1.05], wspace=0.38, hspace=0.6)
    if not heads:
        no_data(fig.add_subplot(grid[:, :2]), summary.get("note", "No heads to show."))
    for index, key in enumerate(heads[:4]):
        ax = fig.add_subplot(grid[index // 2, index % 2])
        _scatter_panel(ax, _heads_frame(frame, key), key, summary, small=True)
        if index == 0:
            ax.legend(fontsize=6.5, loc="upper left", markerscale=2)
    ours = f"Ours (N = {summary['n_prompts']} prompts): {summary.get('note', '')}."
    paper_panel(fig.add_subplot(grid[:, 2]), PAPER_FIG16_TEXT + "\n\n" + ours)
    shown = ", ".join(heads[:4]) or "none"
    title = (f"Fig. 16: attention vs. projection of backup name movers {shown}" if not substituted else
             "Fig. 16 substitute: NO backup name movers in this circuit, showing its negative name "
             f"movers {shown}")
    model_suptitle(fig, title, meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Copy scores
# ------------------------------------------------------------------------------------------------

PAPER_COPY_TEXT = (
    "Paper §3.1: 'All three Name Mover Heads have a copy score above 95%, compared to less than "
    "20% for an average head.' Negative name movers (10.7, 11.10) have 'a large negative copy "
    "score ... (98% compared to 12% for an average head)'. N = 1000 prompts; a sample is a hit "
    "when its own name is in the top 5 logits."
)


def copy_scores(frame, summary, meta):
    """Copy / negative copy score heatmaps (0..1) and the circuit's heads vs the paper's numbers."""
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    copy = grid_from_dict(summary["copy_score"], n_layers, n_heads)
    negative = grid_from_dict(summary["negative_copy_score"], n_layers, n_heads)
    classes = ("name mover", "negative name mover", "backup name mover")
    outlined = outlines(summary, classes)
    present = [c for c in classes if c in set(outlined.values())]
    fig = plt.figure(figsize=(15, 9))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1], hspace=0.45, wspace=0.5)
    for index, (values, name, cmap) in enumerate(((copy, "copy score", "Greys"),
                                                  (negative, "negative copy score", "Greys"))):
        ax = fig.add_subplot(grid[0, index])
        head_heatmap(ax, values, cbar_label=f"{name} (fraction of 3N samples)", outlined=outlined,
                     symmetric=False, cmap=cmap)
        ax.images[0].set_clim(0, 1)
        ax.set_title(f"{name.capitalize()} of every head", fontsize=9)
        outline_legend(ax, present, outline_label(meta))

    ax = fig.add_subplot(grid[1, 0])
    by_class = circuit_classes(summary)
    entries = [(f"{l}.{h}", "name mover") for l, h in by_class.get("name mover", [])]
    entries += [(f"{l}.{h}", "negative name mover") for l, h in by_class.get("negative name mover", [])]
    names = [k for k, _ in entries] + ["mean of all heads"]
    cs = [_num(summary["copy_score"].get(k)) for k, _ in entries] + [_num(summary["copy_score_mean_all_heads"])]
    ns = [_num(summary["negative_copy_score"].get(k)) for k, _ in entries] + [
        _num(summary["negative_copy_score_mean_all_heads"])]
    x = np.arange(len(names))
    ax.bar(x - 0.2, cs, 0.4, color="#4c72b0", label="copy score")
    ax.bar(x + 0.2, ns, 0.4, color="#c44e52", label="negative copy score")
    paper = summary.get("paper", {})
    for index, (_, cls) in enumerate(entries):
        if cls == "name mover":
            ax.plot([index - 0.4, index], [paper.get("name_mover_copy_score_above", 0.95)] * 2, **PAPER_MARK)
        else:
            ax.plot([index, index + 0.4], [paper.get("negative_copy_score", 0.98)] * 2, **PAPER_MARK)
    last = len(names) - 1
    ax.plot([last - 0.4, last], [paper.get("average_copy_score_below", 0.20)] * 2, **PAPER_MARK)
    ax.plot([last, last + 0.4], [paper.get("average_negative_copy_score", 0.12)] * 2, **PAPER_MARK)
    ax.set_xticks(x)
    short = {"name mover": "NM", "negative name mover": "neg. NM"}
    ax.set_xticklabels([f"{n}\n{short[c]}" for n, (_, c) in zip(names, entries)] + ["mean of\nall heads"],
                       fontsize=7.5)
    for tick, (_, cls) in zip(ax.get_xticklabels(), entries):
        tick.set_color(CLASS_COLOURS.get(cls, "black"))
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score (fraction of samples with own name in top 5)")
    ax.set_xlabel("circuit head (NM = name mover, neg. NM = negative name mover)")
    ax.set_title("Circuit heads vs the paper: name movers >95%, negative 98%, average <20% / 12%",
                 fontsize=8)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + [_paper_legend_handle()], fontsize=7, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    ours = (f"Ours ({summary['n_samples']} samples): name movers' min copy score "
            f"{pct(summary.get('name_mover_copy_score_min'))}; negative name movers' min negative copy "
            f"score {pct(summary.get('negative_name_mover_negative_copy_score_min'))}; average head "
            f"{pct(summary['copy_score_mean_all_heads'])} / {pct(summary['negative_copy_score_mean_all_heads'])}. "
            f"Value biases unfolded (b_V added as the paper code): {summary.get('value_biases_unfolded')}.")
    paper_panel(fig.add_subplot(grid[1, 1]), PAPER_COPY_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Copy scores (paper §3.1; paper code's check_copy_circuit)", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Repeated random tokens: Fig. 18 (head scores) and Fig. 17 (next-token contribution)
# ------------------------------------------------------------------------------------------------

PAPER_FIG18_TEXT = (
    "Paper App. H (previous token and induction scores) / App. I, Fig. 18 (random tokens, repeated): 3.0 and 0.1 are among the three heads with "
    "the highest duplicate token score (0.10 does not appear); 4.11 and 2.2 are the two heads with "
    "the highest previous token score; 5.5 and 6.9 are among the 5 heads with the highest induction "
    "score."
)
PAPER_FIG17_TEXT = (
    "Paper App. H, Fig. 17: per-head contribution ⟨h(X), W_U[B]⟩ to predicting the next token B of a "
    "repeated pattern [A][B]…[A], ordered by |contribution|. 'The two Induction Heads (5.5 and 6.9) "
    "appear in the 20 heads contributing the most'; most negative / backup / regular name movers "
    "write in the next-token direction, negative name movers negatively."
)
FIG18_PANELS = (
    ("duplicate_token", "Duplicate token score (i → i−100)", "duplicate token"),
    ("previous_token", "Previous token score (i → i−1)", "previous token"),
    ("induction", "Induction score (i → i−99)", "induction"),
)


def fig18_head_scores(frame, summary, meta):
    """Fig. 18: duplicate-token, previous-token and induction scores, the circuit's heads outlined."""
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    fig = plt.figure(figsize=(18, 4.6))
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 0.85], wspace=0.55)
    for index, (key, title, cls) in enumerate(FIG18_PANELS):
        ax = fig.add_subplot(grid[index])
        values = grid_from_dict(summary[key], n_layers, n_heads)
        outlined = outlines(summary, (cls,))
        head_heatmap(ax, values, cbar_label="mean attention probability", outlined=outlined,
                     symmetric=False, cmap="Greys")
        ax.images[0].set_clim(0, max(1e-6, float(np.nanmax(values))))
        annotate_heads(ax, values, min(3, values.size))
        ax.set_title(f"{title}; top 3 labelled", fontsize=8.5)
        outline_legend(ax, [cls] if outlined else [], outline_label(meta))
    ours = (f"Ours: {summary['n_sequences']} sequences of {summary['seq_len']} random tokens (ids "
            f"{summary['vocab_range'][0]}–{summary['vocab_range'][1] - 1}), repeated once, no BOS.")
    paper_panel(fig.add_subplot(grid[3]), PAPER_FIG18_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Fig. 18: head scores on repeated random tokens", meta)
    return fig


FIG17_TOP = 30


def fig17_next_token(frame, summary, meta):
    """Fig. 17: heads ordered by |next-token contribution| (top 30), coloured by circuit class."""
    values = {k: v for k, v in summary["next_token_contribution"].items() if v is not None}
    order = sorted(values, key=lambda k: -abs(values[k]))[:FIG17_TOP]
    classes = class_lookup(summary)
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2.6, 1]})
    colours = [CLASS_COLOURS.get(classes.get(k, "other"), CLASS_COLOURS["other"]) for k in order]
    ax.bar(np.arange(len(order)), [values[k] for k in order], color=colours)
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels(order, rotation=90, fontsize=7)
    for tick, key in zip(ax.get_xticklabels(), order):
        if key in classes:
            tick.set_color(CLASS_COLOURS.get(classes[key], "black"))
            tick.set_fontweight("bold")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel(f"head (layer.head), the {len(order)} largest |contribution| in order")
    ax.set_ylabel("mean ⟨head output, W_U[next token]⟩ (raw, no final LN)")
    shown = [c for c in CLASS_COLOURS if c != "other" and c in set(classes.get(k) for k in order)]
    handles = [Patch(color=CLASS_COLOURS[c], label=c) for c in shown]
    handles.append(Patch(color=CLASS_COLOURS["other"], label="not in the circuit"))
    ax.legend(handles=handles, fontsize=7, title=f"circuit class ({outline_label(meta)})",
              title_fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ranks = {k: i + 1 for i, k in enumerate(sorted(values, key=lambda k: -abs(values[k])))}
    induction = [f"{l}.{h}" for l, h in circuit_classes(summary).get("induction", [])]
    ours = "Ours: rank by |contribution| of the circuit's induction heads: " + (
        ", ".join(f"{k} #{ranks[k]}" for k in induction if k in ranks) or "n/a") + "."
    paper_panel(ax_text, PAPER_FIG17_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Fig. 17: contribution of each head to next-token prediction on repeated "
                             "random tokens", meta)
    return fig

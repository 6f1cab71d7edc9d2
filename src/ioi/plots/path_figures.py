"""Figures of the path-patching experiments (paper §3.1-3.4, App. C, D, F, J; Figs. 3b, 4b, 4c, 5b, 12b,
13b, 15, 19).

Plotters get ``(frame, summary, meta)`` only; the model shape, the circuit's heads by class, the
receivers and every per-head value (``"layer.head"`` dicts) are in the summaries written by
:mod:`ioi.experiments.path_figures`. Values are the paper code's "% change in logit difference"
(negative: the path supports the task); heatmaps use RdBu centred at 0, grey cells are senders that
cannot reach a receiver.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from ioi.plots.attribution import (
    annotate_heads,
    circuit_classes,
    class_lookup,
    grid_from_dict,
    head_list_text,
    outlines,
    parse_head,
)
from ioi.plots.common import (
    CLASS_COLOURS, ci_error_bars, head_heatmap, model_suptitle, num, outline_label, paper_panel, sci,
)

PCT = "% change in logit difference"
RECEIVER_STYLE = dict(fill=False, lw=1.2, ls=(0, (2, 1.5)), edgecolor="black")


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def _num(value) -> float:
    return np.nan if value is None else float(value)


def _heatmap_size(summary: Mapping, n_maps: int = 1, text_width: float = 4.5) -> tuple[float, float]:
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    width = n_maps * max(4.2, 0.42 * n_heads + 2.4) + text_width
    return width, max(3.9, 0.36 * n_layers + 2.0)


def _mark_receivers(ax, receivers: Iterable[str]) -> None:
    for key in receivers:
        layer, head = parse_head(key)
        ax.add_patch(Rectangle((head - 0.36, layer - 0.36), 0.72, 0.72, **RECEIVER_STYLE))


def _legend_below(ax, classes: Sequence[str], label: str, *, receivers: str | None = None,
                  extra: Sequence = (), offset: float = -0.14) -> None:
    handles = [Rectangle((0, 0), 1, 1, fill=False, lw=2, edgecolor=CLASS_COLOURS.get(c, "black"), label=c)
               for c in classes]
    if receivers:
        handles.append(Rectangle((0, 0), 1, 1, label=receivers, **RECEIVER_STYLE))
    handles.extend(extra)
    if handles:
        ax.legend(handles=handles, title=f"outlined: {label}", loc="upper center",
                  bbox_to_anchor=(0.5, offset), ncol=min(len(handles), 3), fontsize=7,
                  title_fontsize=7, frameon=False)


def _effect_heatmap(ax, summary: Mapping, key: str, classes: Sequence[str], meta: Mapping, *,
                    receivers: Sequence[str] = (), receiver_label: str | None = None,
                    annotate: int = 6, legend: bool = True, title: str = "") -> np.ndarray:
    """Layer x head heatmap of ``summary[key]`` (RdBu at 0, NaN grey) with circuit outlines."""
    grid = grid_from_dict(summary[key], summary["n_layers"], summary["n_heads"])
    outlined = outlines(summary, classes)
    head_heatmap(ax, grid, cbar_label=PCT, outlined=outlined)
    _mark_receivers(ax, receivers)
    annotate_heads(ax, grid, min(annotate, int(np.isfinite(grid).sum())))
    if title:
        ax.set_title(title, fontsize=8)
    if legend:
        present = [c for c in classes if c in set(outlined.values())]
        _legend_below(ax, present, outline_label(meta),
                      receivers=receiver_label if receivers else None)
    return grid


def _signed_pct(value: float) -> str:
    return num(value, signed=True) + "%"


def _ours_heads(summary: Mapping, key: str, n: int = 4) -> str:
    values = summary[key]
    neg = summary.get(f"{key}_top_negative", [])[:n]
    pos = summary.get(f"{key}_top_positive", [])[:n]
    pos = [h for h in pos if (values.get(h) or 0) > 0]
    neg = [h for h in neg if (values.get(h) or 0) < 0]
    return (f"Ours (clean LD {num(_num(summary.get('clean_logit_diff')))}): most negative "
            f"{head_list_text(neg, values, _signed_pct) or 'none'}; most positive "
            f"{head_list_text(pos, values, _signed_pct) or 'none'}.")


def _class_note(summary: Mapping, classes: Sequence[str]) -> str:
    by_class = circuit_classes(summary)
    parts = [f"{c}: {', '.join(f'{l}.{h}' for l, h in by_class[c])}" for c in classes if c in by_class]
    return "Circuit heads (" + "; ".join(parts) + ")." if parts else ""


def _heads_to_receivers(summary, meta, *, title: str, paper: str, classes: Sequence[str],
                        receiver_label: str):
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=_heatmap_size(summary),
                                      gridspec_kw={"width_ratios": [1.45, 1]})
    receivers = summary.get("receivers", [])
    _effect_heatmap(ax, summary, "effect", classes, meta, receivers=receivers,
                    receiver_label=receiver_label,
                    title=f"sender at {summary['sender_position']} → {summary['receiver_class']} "
                          f"{summary['receiver_input']} at {summary['receiver_position']}; grey: "
                          "cannot reach a receiver")
    ours = _ours_heads(summary, "effect") + " " + _class_note(summary, classes)
    ours += f" Receivers: {', '.join(receivers)}."
    if summary.get("receiver_note"):
        ours += f" ({summary['receiver_note']})"
    paper_panel(ax_text, paper + "\n\n" + ours)
    model_suptitle(fig, title, meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Fig. 3b
# ------------------------------------------------------------------------------------------------

PAPER_FIG3B = (
    "Paper §3.1, Fig. 3b (path patching each head → logits, sender at END, x_new from p_ABC): "
    "'patching 9.6, 9.9, and 10.0 causes a large drop' in logit difference (name movers), "
    "'while 10.7 and 11.10 cause a large increase' (negative name movers). No magnitudes in the "
    "text; the paper code plots the % change relative to the clean LD."
)


def fig3b(frame, summary, meta):
    """PP heads -> logits (END) with name movers / negative name movers outlined, plus the
    all-positions variant."""
    classes = ("name mover", "negative name mover")
    width, height = _heatmap_size(summary, n_maps=2)
    fig, axes = plt.subplots(1, 3, figsize=(width + 1.5, height),
                             gridspec_kw={"width_ratios": [1.35, 0.95, 1], "wspace": 0.55})
    _effect_heatmap(axes[0], summary, "effect", classes, meta,
                    title="sender patched at END only (paper code)")
    diff = summary.get("all_positions_max_abs_difference")
    note = "" if diff is None else f"\nmax |difference| from END-only: {sci(diff)} (heads frozen: only\nthe sender's END output reaches the END logits)"
    _effect_heatmap(axes[1], summary, "effect_all_positions", classes, meta, annotate=4,
                    legend=False, title="variant: sender patched at every position (seed notebook)" + note)
    axes[1].title.set_fontsize(7)
    ours = _ours_heads(summary, "effect")
    paper_panel(axes[2], PAPER_FIG3B + "\n\n" + ours)
    model_suptitle(fig, "Fig. 3b: path patching each head → logits", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Figs. 4b, 5b, 12b, 13b
# ------------------------------------------------------------------------------------------------

PAPER_FIG4B = (
    "Paper §3.2, Fig. 4b (path patching each head → the name movers' queries at END): 'Heads 7.3, "
    "7.9, 8.6, 8.10 directly influence the Name Mover Heads' queries, causing a significant drop "
    "in logit difference'; caption: 'The four heads causing a decrease in logit difference are "
    "S-Inhibition Heads.' No magnitudes."
)
PAPER_FIG5B = (
    "Paper §3.3, Fig. 5b (path patching each head at S2 → the S-inhibition heads' values at S2): "
    "'We identified 4 heads with a significant negative effect': two attend S2→S1 (duplicate token "
    "heads, 0.1 and 3.0) and two S2→S1+1 (induction heads, 5.5 and 6.9); the identities are "
    "inferred from App. C/H. No magnitudes."
)
PAPER_FIG12B = (
    "Paper App. C, Fig. 12b (path patching each head at S2 → the S-inhibition heads' keys at S2): "
    "the duplicate token heads 3.0 and 0.1 'appear to also influence S-Inhibition Heads' values, "
    "but their effect is reversed' (positive here); 5.9, 5.8 (fuzzy induction) and 0.10 (fuzzy "
    "duplicate token) influence the logit difference positively, i.e. patching them lowers it "
    "(negative here)."
)
PAPER_FIG13B = (
    "Paper §3.3, App. D, Fig. 13b (path patching each head at S1+1 → the keys of the induction "
    "heads 5.5 and 6.9 at S1+1): "
    "'the two main heads causing a decrease in logit difference' are the previous token heads "
    "4.11 and 2.2. Query composition at S2: no significant effect found."
)


def fig4b(frame, summary, meta):
    return _heads_to_receivers(
        summary, meta, title="Fig. 4b: path patching each head → name mover queries",
        paper=PAPER_FIG4B, classes=("s-inhibition",), receiver_label="receivers (name movers)")


def fig5b(frame, summary, meta):
    return _heads_to_receivers(
        summary, meta, title="Fig. 5b: path patching each head → S-inhibition values",
        paper=PAPER_FIG5B, classes=("induction", "duplicate token"),
        receiver_label="receivers (S-inhibition)")


def fig12b(frame, summary, meta):
    return _heads_to_receivers(
        summary, meta, title="Fig. 12b: path patching each head → S-inhibition keys",
        paper=PAPER_FIG12B, classes=("induction", "duplicate token"),
        receiver_label="receivers (S-inhibition)")


def fig13b(frame, summary, meta):
    return _heads_to_receivers(
        summary, meta, title="Fig. 13b: path patching each head → induction keys",
        paper=PAPER_FIG13B, classes=("previous token",), receiver_label="receivers (induction)")


PAPER_INDUCTION_QUERIES = (
    "Paper App. D (path patching each head at S2 → the induction heads' queries at S2, the "
    "receivers of Fig. 13b): for query composition at S2 the paper 'did not find any significant "
    "effect'. No magnitudes. Claim: the largest |effect| of any sender is at most a quarter of "
    "Fig. 13b's largest (the key path the paper calls significant)."
)
PAPER_SINH_QUERIES = (
    "Paper §3.3 (path patching each head at END → the S-inhibition heads' queries at END): the "
    "S-inhibition heads' inputs that matter are their values (Fig. 5b) and keys (Fig. 12b) at S2; "
    "the query path has no significant effect. No magnitudes. Claim: the largest |effect| of any "
    "sender is at most a quarter of Fig. 5b's largest."
)


def _null_note(summary) -> str:
    value, head = summary.get("max_abs_effect"), summary.get("max_abs_effect_head")
    return "" if value is None else f"Largest |effect| of any sender: {num(value)}% ({head})."


def induction_queries(frame, summary, meta):
    fig = _heads_to_receivers(
        summary, meta, title="App. D: path patching each head → induction queries (S2)",
        paper=PAPER_INDUCTION_QUERIES + "\n\n" + _null_note(summary),
        classes=("duplicate token", "previous token"), receiver_label="receivers (induction)")
    return fig


def sinh_queries(frame, summary, meta):
    return _heads_to_receivers(
        summary, meta, title="§3.3: path patching each head → S-inhibition queries (END)",
        paper=PAPER_SINH_QUERIES + "\n\n" + _null_note(summary),
        classes=("induction", "duplicate token"), receiver_label="receivers (S-inhibition)")


# ------------------------------------------------------------------------------------------------
# Fig. 4c
# ------------------------------------------------------------------------------------------------

PAPER_FIG4C = (
    "Paper §3.2, Fig. 4c: name mover attention from END to each position on p_IOI before and after "
    "path patching the four S-inhibition heads (7.3, 7.9, 8.6, 8.10) together → the name movers' "
    "queries; black bars = std. Patching 'leads to a greater probability on S1 (and thus less on "
    "IO)'. No numbers in the text."
)
CONDITION_COLOURS = {"before": "#4c72b0", "after": "#dd8452"}


def fig4c(frame, summary, meta):
    """Grouped bars: name mover attention from END to IO / S1 / S2 / other, before and after."""
    keys = summary["key_positions"]
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(11.5, 4.3), gridspec_kw={"width_ratios": [1.4, 1]})
    x = np.arange(len(keys))
    width = 0.38
    for offset, condition, label in ((-0.5, "before", "before (clean p_IOI)"),
                                     (0.5, "after", "after patching S-inh → NM queries")):
        mean = np.array([_num(summary[f"attention_{condition}"][k]) for k in keys])
        std = np.array([_num(summary[f"attention_{condition}_std"][k]) for k in keys])
        ax.bar(x + offset * width, mean, width, color=CONDITION_COLOURS[condition], label=label,
               yerr=np.nan_to_num(std), error_kw=dict(ecolor="black", lw=1.2, capsize=3))
        per_head = summary.get("attention_per_head", {}).get(condition, {})
        for h, values in per_head.items():
            ax.plot(x + offset * width, [_num(values[k]) for k in keys], "o", ms=3, mfc="white",
                    mec="black", mew=0.6, label=None)
    ax.plot([], [], "o", ms=3, mfc="white", mec="black", mew=0.6, label="single name mover means")
    ax.set_xticks(x)
    ax.set_xticklabels([k if k != "other" else "other positions\n(summed)" for k in keys])
    ax.set_xlabel("key position (attention from END)")
    ax.set_ylabel("attention probability (mean over prompts\nand name movers; bars: std over prompts)")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"senders (END): {', '.join(summary['senders'])}; receivers' queries (END): "
                 f"{', '.join(summary['receivers'])}", fontsize=8)
    changes = "; ".join(
        f"END→{k} {summary[f'attention_{k.lower()}_before']:.3f} → "
        f"{summary[f'attention_{k.lower()}_after']:.3f} "
        f"(Δ {num(summary[f'attention_{k.lower()}_after'] - summary[f'attention_{k.lower()}_before'], 2, signed=True)})"
        for k in ("IO", "S1", "S2"))
    ours = (f"Ours: {changes}. LD {num(summary['logit_diff_before'])} → "
            f"{num(summary['logit_diff_after'])} ({num(summary['percent_change'], signed=True)}%). Heads: "
            f"{outline_label(meta)}.")
    paper_panel(ax_text, PAPER_FIG4C + "\n\n" + ours)
    model_suptitle(fig, "Fig. 4c: name mover attention before / after patching S-inhibition "
                             "→ name mover queries", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Fig. 15
# ------------------------------------------------------------------------------------------------

PAPER_FIG15 = (
    "Paper §3.4, Fig. 15: knocking out the three name movers (9.9, 9.6, 10.0; mean ablation at END, "
    "template-wise p_ABC means) leaves the circuit working: 'only 5% drop' in logit difference (the "
    "submission: 10%). After the knockout the negative name movers have 'a less negative effect', "
    "and '10.7 even has a positive effect' (negative in % units). The backup name movers are 'the "
    "eight heads that were not part of any other groups' with an effect above 2%: 9.0, 9.7, 10.1, "
    "10.2, 10.6, 10.10, 11.2, 11.9."
)
N_BARS = 20


def fig15(frame, summary, meta):
    """Heatmaps of PP heads -> logits before / after the name mover knockout, and the heads ordered
    by |effect after|, backup candidates marked."""
    classes = ("name mover", "backup name mover", "negative name mover")
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    map_w = max(4.6, 0.42 * n_heads + 2.4)
    map_h = max(3.9, 0.36 * n_layers + 2.0)
    fig = plt.figure(figsize=(2 * map_w + 4.6, map_h + 4.4))
    grid = fig.add_gridspec(2, 3, width_ratios=[map_w, map_w, 4.6], height_ratios=[map_h, 3.0],
                            hspace=0.55, wspace=0.35)
    ax_before, ax_after = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    knocked = summary.get("knocked_out", [])
    backups = summary.get("backup_candidates", [])
    after_title = ("after knocking out " + (", ".join(knocked) or "nothing")
                   + f"\nLD ratio after / before {num(summary['knockout_logit_diff_ratio'])} "
                   f"(paper {PAPER_KNOCKOUT_RATIO})")
    for ax, key, title in ((ax_before, "effect_before", "before the knockout (= Fig. 3b)"),
                           (ax_after, "effect_after", after_title)):
        _effect_heatmap(ax, summary, key, classes, meta, legend=ax is ax_before, title=title)
        for k in knocked:
            layer, head = parse_head(k)
            ax.plot(head, layer, marker="x", color="black", ms=9, mew=1.5)
        if ax is ax_after:
            for k in backups:
                layer, head = parse_head(k)
                ax.plot(head - 0.28, layer - 0.26, marker="*", color="gold", mec="black", mew=0.5, ms=7)
            ax.legend(handles=[
                Line2D([], [], marker="x", color="black", ls="", label="knocked out (at END)"),
                Line2D([], [], marker="*", color="gold", mec="black", ls="", ms=9,
                       label=f"backup candidates (|effect| > 2%, no other class; {len(backups)})"),
            ], loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7, frameon=False)

    # Bars: heads ordered by decreasing |effect after|.
    ax_bar = fig.add_subplot(grid[1, :])
    after, before = summary["effect_after"], summary["effect_before"]
    ranked = sorted((k for k, v in after.items() if v is not None), key=lambda k: -abs(after[k]))[:N_BARS]
    lookup = class_lookup(summary)
    x = np.arange(len(ranked))
    colours = [CLASS_COLOURS.get(lookup.get(k, "other"), "#999999") for k in ranked]
    ax_bar.bar(x, [_num(before.get(k)) for k in ranked], 0.8, color="none", edgecolor="#888888",
               lw=1.0, ls="--", label="before the knockout")
    ax_bar.bar(x, [after[k] for k in ranked], 0.55, color=colours, label="after the knockout")
    for i, k in enumerate(ranked):
        if k in backups:
            ax_bar.text(i, 0, "★", ha="center", va="bottom" if after[k] >= 0 else "top", fontsize=9,
                        color="black")
    ax_bar.axhline(0, color="black", lw=0.6)
    ax_bar.set_xticks(x)
    ax_bar.set_xticklabels(ranked, rotation=90, fontsize=7)
    for tick, k in zip(ax_bar.get_xticklabels(), ranked):
        if k in backups:
            tick.set_fontweight("bold")
    ax_bar.set_ylabel(PCT)
    ax_bar.set_title(f"the {len(ranked)} heads with the largest |effect| after the knockout "
                     "(★ / bold: backup candidates)", fontsize=8)
    present = list(dict.fromkeys(lookup.get(k, "other") for k in ranked))
    handles = [Patch(color=CLASS_COLOURS.get(c, "#999999"), label=c) for c in present]
    handles.append(Patch(facecolor="none", edgecolor="#888888", ls="--", label="before the knockout"))
    ax_bar.legend(handles=handles, fontsize=7, ncol=min(len(handles), 4), loc="best")
    ax_bar.grid(axis="y", alpha=0.3)

    ax_text = fig.add_subplot(grid[0, 2])
    ratio, (lo, hi) = summary["knockout_logit_diff_ratio"], summary["knockout_logit_diff_ratio_ci"]
    ours = (f"Ours: LD {num(summary['clean_logit_diff'])} → {num(summary['knockout_logit_diff'])} after "
            f"the knockout, ratio {ratio:.3f} (95% CI {_num(lo):.3f}–{_num(hi):.3f}). Backup candidates "
            f"(most negative effect after, excluding S-inhibition, name mover and negative name mover "
            f"heads): {', '.join(backups) or 'none'}. Effects after the knockout are relative to the "
            f"knocked-out LD. Outlines: {outline_label(meta)}.")
    paper_panel(ax_text, PAPER_FIG15 + "\n\n" + ours)
    model_suptitle(fig, "Fig. 15: path patching heads → logits before / after knocking out the "
                             "name movers", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Fig. 19
# ------------------------------------------------------------------------------------------------

PAPER_FIG19 = (
    "Paper App. J, Fig. 19: knocking out (mean ablation, p_ABC means) each MLP individually 'led to "
    "good task performance, except for the first layer': the MLP0 knockout 'reverses the sign of "
    "the logit difference'; knocking out all MLPs except the first gives logit difference −1.1. "
    "Right: path patching each MLP → logits (direct effect)."
)


PAPER_ALL_BUT_MLP0 = -1.1  # App. J: LD with every MLP but MLP0 knocked out
PAPER_KNOCKOUT_RATIO = 0.95  # §3.4: "only 5% drop" after knocking out the name movers


def fig19(frame, summary, meta):
    """Left: LD after knocking out each MLP (and all but MLP0); right: PP MLP -> logits."""
    n_layers = summary["n_layers"]
    fig, (ax_ko, ax_pp, ax_text) = plt.subplots(
        1, 3, figsize=(max(13, 0.5 * n_layers + 10), 4.4), gridspec_kw={"width_ratios": [1.3, 1.1, 1]})
    ko = np.array([_num(v) for v in summary["mlp_knockout_logit_diff"]])
    all_but = _num(summary["all_but_mlp0_knockout_logit_diff"])
    values = np.append(ko, all_but)
    cis = list(summary["mlp_knockout_logit_diff_ci"]) + [summary["all_but_mlp0_knockout_logit_diff_ci"]]
    x = np.arange(n_layers + 1)
    colours = ["#c44e52" if v < 0 else "#4c72b0" for v in values]
    colours[-1] = "#8172b2"
    ax_ko.bar(x, values, color=colours, yerr=ci_error_bars(values, cis), error_kw=dict(lw=0.8, capsize=2))
    clean = _num(summary["clean_logit_diff"])
    ax_ko.axhline(clean, color="black", ls="--", lw=1.1, label=f"clean LD {num(clean)}")
    ax_ko.plot([n_layers - 0.4, n_layers + 0.4], [PAPER_ALL_BUT_MLP0] * 2, color="black", lw=2.2,
               label=f"paper (GPT-2): all but MLP0 → {PAPER_ALL_BUT_MLP0}")
    ax_ko.axhline(0, color="black", lw=0.6)
    ax_ko.set_xticks(x)
    ax_ko.set_xticklabels([str(l) for l in range(n_layers)] + ["all but 0"], fontsize=7)
    ax_ko.set_xlabel("MLP layer knocked out (mean ablation, every position)")
    ax_ko.set_ylabel("logit difference after the knockout")
    ax_ko.legend(fontsize=7, loc="best", title="error bars: 95% bootstrap CI", title_fontsize=7)
    ax_ko.grid(axis="y", alpha=0.3)
    ax_ko.set_title("knockout of each MLP layer", fontsize=8)

    pp = np.array([_num(v) for v in summary["mlp_path_patching_effect"]])
    xs = np.arange(n_layers)
    ax_pp.bar(xs, pp, color=["#c44e52" if v < 0 else "#4c72b0" for v in pp],
              yerr=ci_error_bars(pp, summary["mlp_path_patching_effect_ci"]), error_kw=dict(lw=0.8, capsize=2))
    ax_pp.axhline(0, color="black", lw=0.6)
    ax_pp.set_xticks(xs)
    ax_pp.set_xlabel(f"MLP layer (sender at {summary.get('sender_position', 'END')})")
    ax_pp.set_ylabel(PCT)
    ax_pp.grid(axis="y", alpha=0.3)
    ax_pp.set_title("path patching MLP → logits (direct effect)", fontsize=8)

    ours = (f"Ours: clean LD {num(clean)}; MLP0 knocked out → {num(summary['mlp0_knockout_logit_diff'])}; "
            f"all MLPs but MLP0 knocked out → {num(all_but)}.")
    paper_panel(ax_text, PAPER_FIG19 + "\n\n" + ours)
    model_suptitle(fig, "Fig. 19: MLP knockouts and path patching MLPs → logits", meta)
    return fig

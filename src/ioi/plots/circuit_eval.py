"""Figures of circuit evaluation (paper §4; Figs. 6, 7, 20): faithfulness, completeness, minimality.

Plotters get ``(frame, summary, meta)`` from :mod:`ioi.experiments.circuit_eval`. The paper's own
numbers (released completeness data, Fig. 20) are in the summary only when the circuit is the
paper's and the model has GPT-2 small's shape; they are drawn hollow / as markers and labelled as
the paper's, never as ours.
"""

from __future__ import annotations

import textwrap
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from ioi.paper_values import PAPER_COMPLETENESS_POINTS, PAPER_COMPLETENESS_TEXT, PAPER_FAITHFULNESS, PAPER_FIG20
from ioi.plots.common import CLASS_COLOURS, model_suptitle, model_title, num, paper_panel

KIND_STYLE = {
    "empty": dict(marker="*", s=170, color="black", label="K = ∅ (x = F(C), y = F(M))", zorder=5),
    "random": dict(marker="o", s=22, color="#9e9e9e", alpha=0.75, label="random K", zorder=2),
    "greedy": dict(marker="^", s=36, color="#c0392b", alpha=0.85, label="greedy K (each run's final set)",
                   zorder=3),
    "fig22": dict(marker="D", s=40, color="#1f77b4", alpha=0.9, label="paper's Fig. 22 greedy sets K",
                  zorder=4),
}
GREEDY_LABELS = {
    "paper_code": "greedy K (each run's final set; paper code's rule)",
    "algorithm3": "greedy K (every intermediate set; printed Algorithm 3)",
}


def _kind_style(kind: str, summary: Mapping) -> dict:
    style = dict(KIND_STYLE[kind])
    if kind == "greedy":
        style["label"] = GREEDY_LABELS.get(summary.get("greedy_rule", "paper_code"), style["label"])
    return style
SHORT_CLASS = {
    "name mover": "NM (+backup)", "negative name mover": "negative", "s-inhibition": "S-inh",
    "induction": "induction", "duplicate token": "duplicate", "previous token": "previous",
    "backup name mover": "backup",
}


# The paper's numbers (GPT-2 small, paper circuit; ioi.paper_values): drawn on every model's
# figure, always labelled as the paper's.
PAPER_F_M_TEXT = PAPER_FAITHFULNESS["F_M_text"]
PAPER_GAP_TEXT = PAPER_FAITHFULNESS["faithfulness_gap"]
PAPER_RATIO_TEXT = PAPER_FAITHFULNESS["faithfulness_ratio"]
PAPER_FIG6_POINTS = PAPER_COMPLETENESS_POINTS
PAPER_FIG6_TEXT = PAPER_COMPLETENESS_TEXT


def _paper_ok(summary: Mapping, meta: Mapping) -> bool:
    """Draw the paper's GPT-2 numbers only for a GPT-2-shaped, non-planted model."""
    spec = str(meta.get("model", {}).get("spec", ""))
    return (spec != "planted-ioi" and "planted" not in spec
            and summary.get("n_layers") == 12 and summary.get("n_heads") == 12)


def _maybe(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _ci_err(mean: float, ci) -> list[float]:
    if not ci or ci[0] is None or ci[1] is None:
        return [0.0, 0.0]
    return [max(0.0, mean - ci[0]), max(0.0, ci[1] - mean)]


# ------------------------------------------------------------------------------------------------
# Faithfulness
# ------------------------------------------------------------------------------------------------

PAPER_FAITHFULNESS_TEXT = (
    "Paper §4.1 (GPT-2 small): |F(M) − F(C)| = 0.46, 13% of F(M) = 3.56, i.e. C achieves 87% of the "
    "model's logit difference. §4.3: the naive circuit's faithfulness score is 0.1, 'comparable' "
    "(probably stale: the released data of one N=100 run give F(C) 2.838, naive 2.862, F(M) 3.302, "
    "i.e. gaps 0.46 and 0.44)."
)


def faithfulness(frame, summary, meta):
    """F(M), F(C), F(C_naive) with CIs; F(C)/F(M) per template; the spread over dataset seeds."""
    main = frame[frame["main"].astype(bool)] if "main" in frame else frame
    fig, (ax_bar, ax_tpl, ax_text) = plt.subplots(
        1, 3, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1.0, 1.5, 1.1]})
    labels = ["F(M)\nmodel", "F(C)\ncircuit", "F(C naive)\nnaive circuit"]
    values = [summary["F_M"], summary["F_C"], summary["F_C_naive"]]
    cis = [summary.get("F_M_ci"), summary.get("F_C_ci"), summary.get("F_C_naive_ci")]
    err = np.array([_ci_err(v, c) for v, c in zip(values, cis)]).T
    ax_bar.bar(range(3), values, yerr=err, color=["#4c72b0", "#55a868", "#dd8452"], capsize=4)
    if _paper_ok(summary, meta) and "paper_reference" in summary:
        ref = summary["paper_reference"]
        ax_bar.scatter(range(3), [ref["released_F_M"], ref["released_F_C"], ref["released_F_C_naive"]],
                       marker="D", facecolors="none", edgecolors="black", s=45, zorder=5,
                       label="paper (GPT-2, released data)")
        ax_bar.legend(fontsize=7, loc="lower right")
    paper_f_c = PAPER_F_M_TEXT - PAPER_GAP_TEXT
    for index, value in ((0, PAPER_F_M_TEXT), (1, paper_f_c)):
        ax_bar.plot([index - 0.4, index + 0.4], [value, value], color="black", lw=2,
                    label="paper text (GPT-2): F(M) 3.56, F(C) 3.10" if index == 0 else None)
    ax_bar.legend(fontsize=7, loc="lower right")
    ax_bar.axhline(0, color="black", lw=0.6)
    ax_bar.set_xticks(range(3))
    ax_bar.set_xticklabels(labels, fontsize=8)
    ax_bar.set_ylabel("mean logit difference (95% bootstrap CI)")
    ax_bar.set_title(f"F(C)/F(M) = {summary['faithfulness_ratio']:.3f} (paper {PAPER_RATIO_TEXT}), "
                     f"naive {summary['faithfulness_ratio_naive']:.3f}", fontsize=9)

    templates = sorted(summary.get("by_template", {}))
    x = np.arange(len(templates))
    full = [summary["by_template"][t]["faithfulness_ratio"] for t in templates]
    naive = [summary["by_template"][t]["faithfulness_ratio_naive"] for t in templates]
    ax_tpl.bar(x - 0.2, [np.nan if v is None else v for v in full], 0.4, color="#55a868", label="circuit")
    ax_tpl.bar(x + 0.2, [np.nan if v is None else v for v in naive], 0.4, color="#dd8452", label="naive circuit")
    ax_tpl.axhline(1, color="black", lw=0.6, ls=":")
    ax_tpl.axhline(0.87, color="black", lw=1, ls="--", label="paper 0.87 (all templates)")
    counts = main.groupby("template").size() if len(main) else {}
    ax_tpl.set_xticks(x)
    ax_tpl.set_xticklabels([f"{t}\n(n={int(counts.get(t, 0))})" for t in templates], rotation=90, fontsize=7)
    ax_tpl.set_ylabel("F(C)/F(M) (ratio of template means)")
    ax_tpl.set_title("Per template (few prompts each: noisy)", fontsize=9)
    ax_tpl.legend(fontsize=7)

    seeds = summary.get("seeds", [])
    seed_text = ", ".join(f"{s['seed']}: {s['faithfulness_ratio']:.3f}" for s in seeds
                          if s.get("faithfulness_ratio") is not None)
    std = summary.get("faithfulness_ratio_seed_std")
    lo, hi = summary.get("faithfulness_ratio_ci", [None, None])
    ours = (
        f"Ours: F(M) {summary['F_M']:.3f}, F(C) {summary['F_C']:.3f}, ratio of means "
        f"{summary['faithfulness_ratio']:.3f}"
        + (f" (95% CI {lo:.3f}–{hi:.3f})" if lo is not None else "")
        + f"; gap |F(M) − F(C)| {summary['faithfulness_gap']:.3f}; naive gap "
        f"{summary['faithfulness_gap_naive']:.3f}; |gap_naive − gap_full| "
        f"{summary['naive_minus_full_gap_abs']:.3f}.\n"
        f"Mean of per-prompt ratios (information only): "
        f"{_maybe(summary.get('faithfulness_ratio_per_prompt_mean'))}.\n"
        f"Ratio over dataset seeds ({seed_text})"
        + (f": std {std:.3f}." if std is not None else ".")
    )
    paper_panel(ax_text, PAPER_FAITHFULNESS_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Faithfulness: circuit vs model logit difference (paper §4.1, §4.3)", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Completeness (Fig. 6)
# ------------------------------------------------------------------------------------------------

PAPER_COMPLETENESS_TEXT = (
    "Paper §4.1, Fig. 6: random and class-wise K give small incompleteness; the greedy search finds "
    "K with incompleteness up to 3.09 (87% of F(M)) for the full circuit, and the naive circuit also "
    "fails (Fig. 6b). Released data (one N=100 run): greedy max 3.47 (full), 3.03 (naive); random-K "
    "mean 0.45 / 0.47; removing the name mover class: 0.60 (full) vs 2.75 (naive)."
)


def _padded(values) -> tuple[float, float]:
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    pad = 0.06 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def _draw_paper_points(ax, paper_points) -> None:
    for label, (px, py) in paper_points.items():
        colour = "black" if label == "none" else CLASS_COLOURS.get(label, "#333333")
        ax.scatter([px], [py], marker="o" if label == "none" else "s", s=70, facecolors="none",
                   edgecolors=colour, linewidths=1.4, zorder=4)


def _completeness_panel(ax, frame, summary, name: str, paper_points, limits, full_limits):
    """One Fig. 6 panel. ``limits``: our points' range (and the paper's when comparable);
    ``full_limits``: set when the paper's points lie far outside ours -- they are then drawn in an
    inset at full scale, with our region boxed."""
    rows = frame[frame["circuit"] == name]
    ax.plot(limits, limits, color="black", lw=0.8, ls="--", zorder=1)
    for kind in ("random", "greedy", "fig22"):
        part = rows[rows["kind"] == kind]
        if len(part):
            style = _kind_style(kind, summary)
            ax.scatter(part["x"], part["y"], **{**style, "label": f"{style['label']} ({len(part)})"})
    offsets = ((6, -10), (6, 4), (-6, 6), (-6, -12), (8, -3), (-8, 0), (0, 9))
    for index, r in enumerate(rows[rows["kind"] == "class"].itertuples()):
        colour = CLASS_COLOURS.get(r.label, "#333333")
        ax.scatter([r.x], [r.y], marker="s", s=60, color=colour, edgecolors="black", linewidths=0.5, zorder=4)
        dx, dy = offsets[index % len(offsets)]
        ax.annotate(SHORT_CLASS.get(r.label, r.label), (r.x, r.y), textcoords="offset points",
                    xytext=(dx, dy), fontsize=7, color=colour, ha="left" if dx >= 0 else "right")
    empty = rows[rows["kind"] == "empty"]
    if len(empty):
        ax.scatter(empty["x"], empty["y"], **KIND_STYLE["empty"])
    if paper_points and full_limits is None:
        _draw_paper_points(ax, paper_points)
    elif paper_points:
        inset = ax.inset_axes([0.04, 0.6, 0.36, 0.36])
        inset.plot(full_limits, full_limits, color="black", lw=0.6, ls="--")
        _draw_paper_points(inset, paper_points)
        inset.scatter(rows["x"], rows["y"], s=4, color="#555555")
        inset.add_patch(plt.Rectangle((limits[0], limits[0]), limits[1] - limits[0], limits[1] - limits[0],
                                      fill=False, edgecolor="#c0392b", lw=1))
        inset.set_xlim(full_limits)
        inset.set_ylim(full_limits)
        inset.tick_params(labelsize=6)
        inset.set_title("full scale: paper (hollow) vs ours (red box)", fontsize=6.5)
    ax.set_xlim(limits)
    ax.set_ylim(limits)
    ax.set_aspect("equal")
    ax.set_xlabel("x = F(C \\ K)  (K removed from the circuit)")
    ax.set_ylabel("y = F(M \\ K)  (K knocked out of the model)")
    greedy_max = summary.get(f"greedy_max_incompleteness_{name}")
    random_mean = summary.get(f"random_mean_incompleteness_{name}")
    paper_greedy = (f"{PAPER_FIG6_TEXT['greedy_max_text']} text, " if name == "full" else "") + \
        f"{PAPER_FIG6_TEXT[f'greedy_max_released_{name}']} released"
    ax.set_title(f"({'a' if name == 'full' else 'b'}) {name} circuit: greedy max |x−y| = "
                 f"{num(greedy_max)} (paper {paper_greedy}),\nrandom mean {num(random_mean)} (paper "
                 f"{PAPER_FIG6_TEXT[f'random_mean_released_{name}']})", fontsize=9)
    ax.grid(alpha=0.25)


def fig6_completeness(frame, summary, meta):
    """Fig. 6a/6b: (F(C\\K), F(M\\K)) for the full and the naive circuit, with y = x."""
    paper = summary.get("paper_points") or {k: {c: list(v) for c, v in pts.items()}
                                            for k, pts in PAPER_FIG6_POINTS.items()}
    ours = list(frame["x"]) + list(frame["y"])
    limits, full_limits = _padded(ours), None
    if paper:
        both = _padded(ours + [v for pts in paper.values() for xy in pts.values() for v in xy])
        if (limits[1] - limits[0]) >= 0.25 * (both[1] - both[0]):
            limits = both  # comparable scales: one plot
        else:
            full_limits = both  # ours would be a dot next to the paper's: zoom, paper in an inset
    fig = plt.figure(figsize=(15.5, 7.2), layout="constrained")
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.85])
    axes = [fig.add_subplot(grid[0, i]) for i in range(2)]
    ax_text = fig.add_subplot(grid[0, 2])
    for ax, name in zip(axes, ("full", "naive")):
        _completeness_panel(ax, frame, summary, name, paper.get(name) if paper else None, limits, full_limits)
    handles = [Line2D([], [], ls="--", color="black", lw=0.8, label="y = x (complete)")]
    kinds = [k for k in KIND_STYLE if k != "fig22" or (frame["kind"] == "fig22").any()]
    handles += [Line2D([], [], marker=st["marker"], ls="", color=st["color"],
                       markersize=8 if k != "empty" else 12, label=st["label"])
                for k in kinds for st in [_kind_style(k, summary)]]
    handles.append(Line2D([], [], marker="s", ls="", color="#888888", markeredgecolor="black",
                          label="K = one class (colour = class)"))
    if paper:
        handles.append(Line2D([], [], marker="s", ls="", markerfacecolor="none", markeredgecolor="#333333",
                              markersize=8, label="paper (GPT-2, released data): class K (hollow)"))
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="black",
                              markersize=8, label="paper (GPT-2, released data): K = ∅"))
    classes = [c for c in CLASS_COLOURS if c in set(frame.loc[frame["kind"] == "class", "label"])]
    handles += [Line2D([], [], marker="s", ls="", color=CLASS_COLOURS[c], label=f"class: {c}"
                       + (" (+ backup NMs)" if c == "name mover" else "")) for c in classes]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7, frameon=False)
    counts = summary.get("counts", {})
    top = summary.get("greedy_sets", {}).get("full", [])[:2]
    top_text = "; ".join(f"{{{', '.join(s['heads'])}}} {num(s['incompleteness'])}" for s in top)
    ours = (
        f"Ours: F(M) {num(summary['F_M'])}; class incompleteness (full) 'name mover' "
        f"{num(summary['class_incompleteness_full'].get('name mover', float('nan')))}, (naive) "
        f"{num(summary['class_incompleteness_naive'].get('name mover', float('nan')))}; random mean "
        f"{num(summary['random_mean_incompleteness_full'])} / {num(summary['random_mean_incompleteness_naive'])}; "
        f"greedy max {num(summary['greedy_max_incompleteness_full'])} / "
        f"{num(summary['greedy_max_incompleteness_naive'])}.\nTop greedy sets (full): {top_text}.\n"
        f"Counts: {counts.get('random_sets')} random K per circuit; greedy {counts.get('greedy_runs')} runs × "
        f"≤{counts.get('greedy_iterations_max')} steps × {counts.get('greedy_candidates', {}).get('full')} "
        f"(full) / {counts.get('greedy_candidates', {}).get('naive')} (naive) candidates (paper: 10 runs); "
        f"rule: {GREEDY_LABELS.get(summary.get('greedy_rule', 'paper_code'), '')}. "
        "K 'name mover' = name movers + backup name movers (paper code)."
    )
    if summary.get("fig22_max_incompleteness_full") is not None:
        ours += (f"\nPaper's Fig. 22 sets evaluated as given (no search): max |x−y| = "
                 f"{num(summary['fig22_max_incompleteness_full'])} (paper: up to 3.09).")
    if paper:
        ours += "\nHollow markers: " + summary.get("paper_points_source", "the paper's released data (GPT-2 small, paper circuit, one N=100 run)") + "."
    paper_panel(ax_text, PAPER_COMPLETENESS_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Completeness (paper Fig. 6): x = F(C\\K), y = F(M\\K), incompleteness |x − y|", meta)
    return fig


# ------------------------------------------------------------------------------------------------
# Minimality (Figs. 7, 20)
# ------------------------------------------------------------------------------------------------

PAPER_MINIMALITY_TEXT = (
    "Paper §4.2, Fig. 7: every circuit head has a nontrivial minimality score |F(C\\(K∪{v})) − F(C\\K)|, "
    "at least 1% of F(M); 9.0 and 11.9 are the smallest (0.04, 1.1%); 0.1, 5.5, 0.10, 4.11, 10.7 the "
    "largest (Fig. 20). Fig. 7's F(M) is not stated; the paper % shown are score / 3.56."
)


def fig7_minimality(frame, summary, meta):
    """Fig. 7: minimality score of each circuit head as % of F(M), coloured by class."""
    rows = _rows_in_order(frame, summary)
    f_m = summary["F_M"]
    pct = 100 * rows["score_fraction"].to_numpy(float)
    low = 100 * rows["score_ci_low"].to_numpy(float) / f_m if f_m else np.zeros(len(rows))
    high = 100 * rows["score_ci_high"].to_numpy(float) / f_m if f_m else np.zeros(len(rows))
    err = np.nan_to_num(np.abs(np.stack([pct - np.minimum(low, high), np.maximum(low, high) - pct])))
    colours = [CLASS_COLOURS.get(c, "#666666") for c in rows["class"]]
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(max(10, 0.42 * len(rows) + 6), 4.6),
                                      gridspec_kw={"width_ratios": [max(2.0, 0.09 * len(rows)), 1]})
    x = np.arange(len(rows))
    ax.bar(x, pct, color=colours, yerr=err, error_kw=dict(lw=0.8, capsize=1.5))
    ax.axhline(1, color="black", ls=":", lw=1, label="1% of F(M) (paper's threshold)")
    paper = _paper_ok(summary, meta) and "paper_fig20" in summary
    if paper:
        paper_pct = rows["paper_percent_of_F_M"].to_numpy(float)
        ax.scatter(x, paper_pct, marker="D", facecolors="none", edgecolors="black", s=30, zorder=5,
                   label="paper Fig. 20 (score / 3.56, GPT-2)")
    ax.set_xticks(x)
    ax.set_xticklabels(rows["v"], rotation=90, fontsize=8)
    ax.set_xlabel("circuit head v")
    ax.set_ylabel("minimality score, % of F(M)  (95% bootstrap CI)")
    ax.grid(axis="y", alpha=0.3)
    seen = list(dict.fromkeys(rows["class"]))
    class_handles = [Line2D([], [], marker="s", ls="", color=CLASS_COLOURS.get(c, "#666666"), label=c) for c in seen]
    extra = ax.get_legend_handles_labels()[0]
    ax.legend(handles=class_handles + extra, fontsize=7, ncol=2, loc="upper right")
    smallest = summary.get("min_score_head")
    ours = (f"Ours: F(M) {num(f_m)}, F(C) {num(summary['F_C'])}; smallest score {smallest} "
            f"({num(100 * summary['min_score_fraction'], 2)}% of F(M)). K(v) as in Fig. 20 for the paper "
            "circuit (ioi.circuits.minimality_k_sets), else the other heads of v's class (name movers: "
            "the ones listed before v).")
    paper_panel(ax_text, PAPER_MINIMALITY_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Minimality (paper Fig. 7): |F(C\\(K∪{v})) − F(C\\K)| / F(M)", meta)
    return fig


def _rows_in_order(frame, summary):
    """The minimality rows in the summary's row order, with a ``v`` = "layer.head" column."""
    rows = frame.copy()
    rows["v"] = [f"{int(l)}.{int(h)}" for l, h in zip(rows["layer"], rows["head"])]
    order = summary.get("row_order", list(rows["v"]))
    return rows.set_index("v").loc[order].reset_index()


def _abbreviate(heads: str, limit: int = 5) -> str:
    parts = [p for p in str(heads).strip("{}").split(", ") if p]
    if len(parts) <= limit:
        return "{" + ", ".join(parts) + "}"
    return "{" + ", ".join(parts[:limit]) + f", … +{len(parts) - limit}" + "}"


def _paper_fig20_table(ax) -> None:
    """The paper's Fig. 20 (GPT-2 small, the paper circuit; % = score / 3.56), as a table."""
    from ioi.circuits import PAPER_CIRCUIT

    ax.axis("off")
    cells = []
    for key, (without_k_v, without_k, pct) in PAPER_FIG20.items():
        head = tuple(int(v) for v in key.split("."))
        cells.append([key, PAPER_CIRCUIT.class_of(head) or "", f"{without_k_v:.2f}", f"{without_k:.2f}",
                      f"{abs(without_k_v - without_k):.2f}", f"{pct:.1f}%"])
    columns = ["v", "class", "F(C\\(K∪{v}))", "F(C\\K)", "score", "% of 3.56"]
    table = ax.table(cellText=cells, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    table.auto_set_column_width(range(len(columns)))
    for (r, c), cell in table.get_celld().items():
        cell.set_facecolor("#e8e8e8" if r == 0 else "#f4f4f4")
        if r == 0:
            cell.set_height(cell.get_height() * 2.0)
            cell.set_text_props(fontweight="bold")
        elif c == 1:
            cell.get_text().set_color(CLASS_COLOURS.get(cells[r - 1][1], "black"))
    ax.set_title("The paper's Fig. 20 (GPT-2 small, its 26-head circuit, one N=100 run)", fontsize=9)


def fig20_minimality_table(frame, summary, meta):
    """Fig. 20 as a table: v, class, K∪{v}, F(C\\(K∪{v})), F(C\\K), score, and the paper's F values."""
    rows = _rows_in_order(frame, summary)
    paper = _paper_ok(summary, meta) and "paper_fig20" in summary
    columns = ["v", "class", "K ∪ {v}", "F(C\\(K∪{v}))\nours", "F(C\\K)\nours", "score\nours",
               "% of F(M)\nours"]
    if paper:
        columns += ["F(C\\(K∪{v}))\npaper", "F(C\\K)\npaper", "% of 3.56\npaper"]
    cells = []
    for r in rows.itertuples():
        row = [r.v, rows.loc[r.Index, "class"], _abbreviate(str(r.K_union_v)),
               f"{num(r.F_C_without_K_and_v)}", f"{num(r.F_C_without_K)}", f"{num(r.score)}",
               f"{num(100 * r.score_fraction, 2)}%"]
        if paper:
            k_text = rows.loc[r.Index, "paper_K_text"]
            if isinstance(k_text, str) and k_text:
                row[2] += f"\n(paper: {k_text})"
            row += [f"{r.paper_F_C_without_K_and_v:.2f}", f"{r.paper_F_C_without_K:.2f}",
                    f"{r.paper_percent_of_F_M:.1f}%"]
        cells.append(row)
    height = 0.3 * len(cells) + 1.2 + 0.1 * sum("\n" in c[2] for c in cells)
    if paper:
        fig, ax = plt.subplots(figsize=(14, height))
    else:  # other heads than the paper's: the paper's Fig. 20 as a second table beside ours
        height = max(height, 0.3 * len(PAPER_FIG20) + 1.2)
        fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=(17, height), gridspec_kw={"width_ratios": [1.5, 1]})
        _paper_fig20_table(ax_paper)
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    table.auto_set_column_width(range(len(columns)))
    for (r, c), cell in table.get_celld().items():
        if r == 0:
            cell.set_height(cell.get_height() * 2.0)
            cell.set_facecolor("#e8e8e8")
            cell.set_text_props(fontweight="bold")
        elif "\n" in cells[r - 1][2]:
            cell.set_height(cell.get_height() * 1.8)
        if r > 0 and c == 1:
            cell.get_text().set_color(CLASS_COLOURS.get(cells[r - 1][1], "black"))
        if paper and r > 0 and c >= 7:
            cell.set_facecolor("#f4f4f4")
    note = (f"Ours: F(M) = {summary['F_M']:.3f}, F(C) = {summary['F_C']:.3f}. "
            "Grey columns: the paper's Fig. 20 (GPT-2 small, one N=100 run; % = score / 3.56)."
            if paper else f"Ours: F(M) = {summary['F_M']:.3f}, F(C) = {summary['F_C']:.3f}. Right: the "
            "paper's Fig. 20 for its own circuit (other heads than ours: compare the pattern, not rows).")
    ax.set_title(model_title("Minimality sets and scores (paper Fig. 20)", meta) + "\n"
                 + textwrap.fill(note, 140), fontsize=9)
    return fig

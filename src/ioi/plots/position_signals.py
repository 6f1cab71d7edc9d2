"""Figures of §3.3 "locating the position signal" and App. A pointer arithmetic
(:mod:`ioi.experiments.position_signals`). The paper's values are labelled as the paper's."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ioi.plots.common import ci_error_bars, model_suptitle, num, paper_panel

CELL_LABELS = {
    "orig_tok_inv_pos": "S token,\ninverted position",
    "rand_tok_orig_pos": "random token,\noriginal position",
    "rand_tok_inv_pos": "random token,\ninverted position",
    "inv_tok_orig_pos": "inverted token,\noriginal position",
    "inv_tok_inv_pos": "inverted token,\ninverted position",
}
PAPER_POSITION_TEXT = (
    "Paper §3.3 (GPT-2 small): patching the outputs of the induction and duplicate token heads "
    "'from sentences with altered position signals' gives 'a drop in logit difference of almost the "
    "same size as patching the S-Inhibition Heads (at least 88%)'; from 'a dataset with a different "
    "S1 and S2 token but at the same position' it 'doesn't change the logit difference (less than 8% "
    "of the drop induced by patching S-Inhibition Heads)'. The datasets are not named; ours: the "
    "three inverted-position datasets of Fig. 9, and the random-name dataset with positions kept."
)
PAPER_POINTER_TEXT = (
    "Paper App. A (GPT-2 small): 'When patching in S2 Inhibition outputs from a distribution where "
    "prefixes to sentences are longer (but the distance between S1 and S2 is constant), the logit "
    "difference doesn't change (3.56 before patching vs 3.57 after).' The paper code's flip_prefixes "
    "supplies the longer prefixes."
)


def position_signal(frame, summary, meta):
    """Mean LD drop from patching the S-inhibition heads (END) vs the induction + duplicate-token
    heads (S2), per signal-specific dataset, with the ratio of drops."""
    cells = [c for c in CELL_LABELS if c in summary["cells"]]
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    x = np.arange(len(cells))
    width = 0.38
    for offset, key, label, colour in ((-width / 2, "drop_sinh", "S-inhibition heads (END)", "#7570b3"),
                                       (width / 2, "drop_early", "induction + duplicate token (S2)", "#e7298a")):
        values = [summary["cells"][c][key] for c in cells]
        cis = [summary["cells"][c][f"{key}_ci"] for c in cells]
        ax.bar(x + offset, [np.nan if v is None else v for v in values], width, yerr=ci_error_bars(values, cis),
               label=label, color=colour, capsize=3)
    ratios = [summary["cells"][c]["ratio"] for c in cells]
    ax.axhline(0, color="black", lw=0.6)
    # The ratio of drops sits in each dataset's tick label (an annotation below the bars would
    # run into the tick labels).
    ax.set_xticks(x, [f"{CELL_LABELS[c]}\nratio {'n/a' if r is None else f'{r:.2f}'}"
                      for c, r in zip(cells, ratios)], fontsize=7)
    ax.set_ylabel("drop in logit difference (clean − patched)")
    ax.legend(fontsize=7, loc="upper left")
    ours = (f"Ours: clean LD {num(summary['clean_logit_diff'])}; smallest ratio over the altered-position "
            f"datasets {summary['altered_position_ratio_min'] if summary['altered_position_ratio_min'] is None else round(summary['altered_position_ratio_min'], 3)}; "
            f"same position, random token: "
            f"{summary['same_position_ratio'] if summary['same_position_ratio'] is None else round(summary['same_position_ratio'], 3)}. "
            f"Early heads: {', '.join(summary['early_heads'])}; S-inhibition: {', '.join(summary['sinh_heads'])}.")
    paper_panel(ax_text, PAPER_POSITION_TEXT + "\n\n" + ours)
    model_suptitle(fig, "§3.3: locating the position signal (ratio = early-head drop / "
                             "S-inhibition drop)", meta)
    return fig


def pointer_arithmetic(frame, summary, meta):
    """LD on p_IOI before / after patching the S-inhibition heads from the longer-prefix copy."""
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1, 1.2]})
    keys = (("logit_diff_before", "p_IOI\n(before)"), ("logit_diff_after", "S-inh. patched\nfrom long prefix"),
            ("source_logit_diff", "long-prefix\nprompts"))
    values = [summary[k] for k, _ in keys]
    ax.bar(range(3), [np.nan if v is None else v for v in values],
           yerr=ci_error_bars(values, [summary.get(f"{k}_ci") for k, _ in keys]),
           color=["#999999", "#7570b3", "#cccccc"], capsize=3)
    paper = summary.get("paper_reference")
    if paper:
        ax.scatter([0, 1], [paper["logit_diff_before"], paper["logit_diff_after"]], marker="D", color="black",
                   zorder=3, label="paper (GPT-2 small)")
        ax.legend(fontsize=7)
    ax.set_xticks(range(3), [label for _, label in keys], fontsize=7)
    ax.set_ylabel("logit difference")
    ours = (f"Ours: {num(summary['logit_diff_before'])} before, {num(summary['logit_diff_after'])} after "
            f"(difference {num(summary['difference'], signed=True)}); positions shifted by "
            f"{summary['position_shift_min']}–{summary['position_shift_max']} tokens, S1–S2 distance "
            f"{'kept' if summary['s1_s2_distance_kept'] else 'NOT kept'}.")
    paper_panel(ax_text, PAPER_POINTER_TEXT + "\n\n" + ours)
    model_suptitle(fig, "App. A: pointer arithmetic (S-inhibition outputs from longer prefixes)", meta)
    return fig

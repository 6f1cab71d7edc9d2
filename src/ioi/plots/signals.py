"""Figures of the token / position signals (paper App. A, Figs. 9, 10) and of the adversarial
examples (§4.4, Fig. 8), from :mod:`ioi.experiments.signals`.

The paper's values (GPT-2 small) are printed beside ours and always labelled as the paper's.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np

from ioi.paper_values import PAPER_FIG8 as PAPER_FIG8_ROWS
from ioi.paper_values import PAPER_FIG9
from ioi.plots.common import model_suptitle, num, paper_panel

TOKEN_ROWS = ((1, "Original S token signal"), (0, "Random S token signal"), (-1, "S↔IO inverted token signal"))
POSITION_COLUMNS = ((1, "Original positional signal"), (-1, "Inverted position signal"))
CELL_OF = {(1, 1): "orig_tok_orig_pos", (1, -1): "orig_tok_inv_pos", (0, 1): "rand_tok_orig_pos",
           (0, -1): "rand_tok_inv_pos", (-1, 1): "inv_tok_orig_pos", (-1, -1): "inv_tok_inv_pos"}
# (LD, IO probability, S>IO rate) per Fig. 8 row
PAPER_FIG8 = {row: (v["logit_diff_mean"], v["io_prob_mean"], v["s_over_io_rate"]) for row, v in PAPER_FIG8_ROWS.items()}

PAPER_SIGNALS_TEXT = (
    "Paper App. A, Fig. 9 (GPT-2 small): activation patching the outputs of the S-inhibition heads "
    "7.3, 7.9, 8.6, 8.10 (at END) from six signal-specific datasets into p_IOI gives LD 3.55 "
    "(baseline), −0.99, 2.45, −1.96, 1.77, −3.16. 'The logit difference can be well approximated by "
    "2.31 S_pos + 0.99 S_tok, with a mean error of 7% relative to the baseline': position signals "
    "matter more than token signals, and the effects add."
)
PAPER_NM_TEXT = (
    "Paper App. A, Fig. 10 (GPT-2 small, no numbers in the text): after patching the S-inhibition "
    "heads from the dataset with both signals inverted (S2 := IO), the name movers 'attend and copy "
    "the S1 token instead of the IO token'; with a random token signal only (positions kept) the "
    "effect is partial."
)
PAPER_ADV_TEXT = (
    "Paper §4.4, App. L, Fig. 8 (GPT-2 small): adding a natural sentence that names IO (e.g. "
    "'John and Mary went to the store. Mary had a good day. John gave a bottle of milk to') drops "
    "the LD to 1.23 and makes the model predict S over IO 23.4% of the time; the control naming S "
    "gives an even higher LD (3.64) than p_IOI (3.55). The paper code's final cell inserts two "
    "sentences (DOUBLE_ADX_TEMPLATE), so the paper's values sit beside our two-sentence rows."
)


def _num(value: float, scale: float, digits: int = 2) -> str:
    """``digits`` decimals at the paper's scale; 3 significant digits for tiny values (random models)."""
    return f"{value:.{digits}f}" if abs(scale) >= 10 ** (1 - digits) else f"{num(value)}"


def _fmt_ci(value, ci, digits: int = 2, scale: float | None = None) -> str:
    if value is None:
        return "n/a"
    scale = abs(value) if scale is None else scale
    text = _num(value, scale, digits)
    if ci and ci[0] is not None and ci[1] is not None:
        text += f"\n[{_num(ci[0], scale, digits)}, {_num(ci[1], scale, digits)}]"
    return text


def fig9_signals_table(frame, summary, meta):
    """Fig. 9: 3 x 2 table (token signal x position signal) of the LD after patching the
    S-inhibition heads, ours (95% CI) with the paper's value in each cell."""
    cells, cis = summary["cells"], summary.get("cell_ci", {})
    grid = np.array([[cells[CELL_OF[(t, p)]] for p, _ in POSITION_COLUMNS] for t, _ in TOKEN_ROWS], dtype=float)
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(12.5, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
    bound = float(np.nanmax(np.abs(grid))) or 1.0
    image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label("LD after patching (ours)")
    for i, (t, _) in enumerate(TOKEN_ROWS):
        for j, (p, _) in enumerate(POSITION_COLUMNS):
            cell = CELL_OF[(t, p)]
            value = cells[cell]
            r, g, b, _ = image.cmap(image.norm(value))
            colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
            ax.text(j, i - 0.12, "ours " + _fmt_ci(value, cis.get(cell), scale=bound), ha="center", va="center",
                    fontsize=9, color=colour, fontweight="bold")
            ax.text(j, i + 0.3, f"paper (GPT-2): {PAPER_FIG9[cell]:.2f}", ha="center", va="center",
                    fontsize=8, color=colour, style="italic")
    ax.set_xticks(range(len(POSITION_COLUMNS)))
    ax.set_xticklabels([label for _, label in POSITION_COLUMNS])
    ax.set_yticks(range(len(TOKEN_ROWS)))
    ax.set_yticklabels([label for _, label in TOKEN_ROWS])
    ax.set_title("LD after patching the S-inhibition heads' END outputs\n"
                 f"(heads {', '.join(summary.get('patched_heads', []))}); ours with 95% bootstrap CI\n"
                 f"fit: ours LD ≈ {num(summary['fit_position_coefficient'])} S_pos "
                 f"{num(summary['fit_token_coefficient'], signed=True)} S_tok; paper 2.31 S_pos + 0.99 S_tok",
                 fontsize=9)
    ours = (
        f"Ours: clean LD {num(summary['clean_logit_diff_mean'])} (= the original/original cell). Fit "
        f"LD ≈ {num(summary['fit_position_coefficient'])} S_pos {num(summary['fit_token_coefficient'], signed=True)} S_tok, "
        f"mean error {100 * summary['fit_mean_relative_error']:.1f}% of the baseline "
        "(paper: 2.31, 0.99, 7%). Random-token datasets: string flips 'ABB->CDD, BAB->DCD' / "
        "'ABB->DCD, BAB->CDD'; inverted token: S↔IO swapped; inverted position: IO↔S1 swapped."
    )
    paper_panel(ax_text, PAPER_SIGNALS_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Token vs position signals (paper App. A, Fig. 9): ours vs paper values", meta)
    return fig


def fig10_nm_attention(frame, summary, meta):
    """Fig. 10: the name movers' attention END -> IO / S1 / S2 before and after patching the
    S-inhibition heads from (a) the random-token dataset and (b) the inverted-token-and-position one."""
    attention = summary.get("nm_attention", {})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.05]})
    panels = (("rand_tok_orig_pos", "(a) random token, original position"),
              ("inv_tok_inv_pos", "(b) inverted token and position (S2 := IO)"))
    keys = ("io", "s1", "s2")
    x = np.arange(len(keys))
    top = 0.0
    for ax, (cell, title) in zip(axes[:2], panels):
        if cell not in attention or "clean" not in attention:
            ax.axis("off")
            ax.text(0.5, 0.5, "no name movers in the circuit", ha="center", va="center")
            continue
        for offset, (source, label, colour) in zip(
                (-0.2, 0.2), (("clean", "before patching (p_IOI)", "#4c72b0"),
                              (cell, "after patching", "#c44e52"))):
            means = [attention[source][k]["mean"] for k in keys]
            stds = [attention[source][k]["std"] or 0.0 for k in keys]
            ax.bar(x + offset, means, 0.4, yerr=stds, color=colour, label=label, capsize=3)
            top = max(top, max(m + s for m, s in zip(means, stds)))
        ax.set_xticks(x)
        ax.set_xticklabels(["END → IO", "END → S1", "END → S2"])
        ax.set_ylabel("attention probability (mean over name movers)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, title="error bars: std over prompts", title_fontsize=7, loc="upper center",
                  ncol=2)
    for ax in axes[:2]:
        if ax.axison:
            ax.set_ylim(0, max(top * 1.3, 1e-3))  # room for the legend above the bars
    heads = ", ".join(summary.get("name_mover_heads", []))
    paper_panel(axes[2], PAPER_NM_TEXT + f"\n\nOurs: name movers {heads}; S-inhibition heads "
                f"{', '.join(summary.get('patched_heads', []))} patched at END.")
    model_suptitle(fig, "Name mover attention before / after patching the S-inhibition heads "
                             "(paper Fig. 10)", meta)
    return fig


VARIANT_LABELS = {
    "clean": "p_IOI",
    "extra_s": "Additional occurrence of S (natural sentence)",
    "extra_io": "Additional occurrence of IO (natural sentence)",
    "extra_s_double": "Two sentences naming S (paper code's final call)",
    "extra_io_double": "Two sentences naming IO (paper code's final call)",
}
# Which of our rows carries the paper's Fig. 8 values, by summary["fig8_variant"].
FIG8_ROWS = {"single": {"extra_io": "extra_io", "extra_s": "extra_s"},
             "double": {"extra_io_double": "extra_io", "extra_s_double": "extra_s"}}


def fig8_adversarial_table(frame, summary, meta):
    """Fig. 8 as a table: LD, IO probability and S>IO rate, ours (95% CI) beside the paper's."""
    columns = ["Distribution", "Logit difference\nours [95% CI]", "LD\npaper", "IO probability\nours",
               "IO prob.\npaper", "S logit > IO\nours", "S > IO\npaper"]
    cells = []
    variants = [v for v in ("clean", "extra_s", "extra_io", "extra_s_double", "extra_io_double") if v in summary]
    ld_scale = max(abs(summary[v]["logit_diff_mean"]) for v in variants)
    prob_scale = max(abs(summary[v]["io_prob_mean"]) for v in variants)
    fig8_variant = summary.get("fig8_variant", "double")
    paper_rows = {"clean": "clean", **FIG8_ROWS[fig8_variant]}
    for variant in variants:
        v = summary[variant]
        paper = PAPER_FIG8.get(paper_rows.get(variant, ""))
        cells.append([
            VARIANT_LABELS[variant],
            _fmt_ci(v["logit_diff_mean"], v.get("logit_diff_mean_ci"), scale=ld_scale).replace("\n", " "),
            f"{paper[0]:.2f}" if paper else "—",
            _fmt_ci(v["io_prob_mean"], v.get("io_prob_mean_ci"), 2, scale=prob_scale).replace("\n", " "),
            f"{paper[1]:.2f}" if paper else "—",
            f"{100 * v['s_over_io_rate']:.1f}%",
            f"{100 * paper[2]:.1f}%" if paper else "—",
        ])
    fig = plt.figure(figsize=(13.5, 5.2))
    ax = fig.add_axes([0.02, 0.5, 0.96, 0.4])
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8.5)
    table.auto_set_column_width(range(len(columns)))
    for (r, c), cell in table.get_celld().items():
        cell.set_height(0.2 if r == 0 else 0.13)
        if r == 0:
            cell.set_facecolor("#e8e8e8")
            cell.set_text_props(fontweight="bold")
        elif c in (2, 4, 6):
            cell.set_facecolor("#f4f4f4")
    examples = summary.get("example", {})
    example_text = "\n".join(
        textwrap.fill(f"{VARIANT_LABELS[k].split(' (')[0]}: \"{examples[k]}\"", 150)
        for k in ("clean", "extra_io", "extra_s", "extra_io_double") if k in examples)
    ax_text = fig.add_axes([0.02, 0.02, 0.96, 0.4])
    ax_text.axis("off")
    ax_text.text(0, 1, "Examples (prompt up to END; the answer IO follows):\n" + example_text,
                 va="top", fontsize=8, transform=ax_text.transAxes)
    ax_text.text(0, 0.5, textwrap.fill(PAPER_ADV_TEXT, 165) + "\n"
                 + textwrap.fill(f"Ours: Fig. 8 is compared with the '{fig8_variant}' rows (the "
                                 "paper code's final call uses two sentences); the one-sentence rows (the "
                                 "paper's App. L example) are the named alternative. Each prompt gets "
                                 "App. L sentences drawn with a seeded generator, the same for its IO and "
                                 "S versions, inserted after the first clause's '.' (else its last ','). "
                                 "Grey columns: the paper's Fig. 8 values (GPT-2 small), beside the "
                                 "rows they are compared with.", 165),
                 va="top", fontsize=8, transform=ax_text.transAxes)
    model_suptitle(fig, "Adversarial examples (paper Fig. 8): ours vs paper values", meta)
    return fig

"""Figures of model performance: the seed's example-prompt table and the p_IOI baseline."""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns

from ioi.plots.common import model_suptitle, model_title, paper_panel

PAPER_BASELINE_TEXT = (
    "Mean logit difference 3.56 over 100,000 p_IOI prompts (3.55 in the Fig. 8/9 tables); "
    "IO predicted over S 99.3% of the time; mean IO probability 0.49 (§2, Fig. 8)."
)


def logit_diff_table(frame, summary, meta):
    """Seed notebook: per-prompt logit difference on its 8 example prompts, as a table."""
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(frame) + 1.4))
    ax.axis("off")
    cells = [[r.prompt, r.correct, r.incorrect, f"{r.logit_diff:.3f}"] for r in frame.itertuples()]
    table = ax.table(cellText=cells, colLabels=["Prompt (BOS prepended)", "Correct", "Incorrect",
                                               "Logit diff."], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(range(4))
    ax.set_title(model_title(f"Logit differences on the seed's example prompts "
                             f"(mean {summary['logit_diff_mean']:.3f})", meta))
    return fig


def baseline_logit_diff(frame, summary, meta):
    """Distribution of the per-prompt logit difference on p_IOI and p_ABC, and per template."""
    fig, (ax_hist, ax_tpl, ax_text) = plt.subplots(
        1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.2, 1.4, 0.9]}
    )
    sns.histplot(data=frame, x="logit_diff", hue="dataset", bins=40, ax=ax_hist, element="step")
    ax_hist.axvline(3.56, color="black", ls="--", lw=1, label="paper 3.56")
    ax_hist.set_xlabel("logit(IO) - logit(S) at END")
    ioi_rows = frame[frame.dataset == "ioi"]
    order = sorted(ioi_rows.template.unique())
    sns.barplot(data=ioi_rows, y="template", x="logit_diff", order=order, ax=ax_tpl,
                errorbar=("ci", 95), seed=0, color="#4c72b0")  # seeded bootstrap: the same figure every run
    ax_tpl.axvline(3.56, color="black", ls="--", lw=1)
    ax_tpl.set_xlabel("mean logit difference (95% CI)")
    ours = (f"Ours: LD {summary['logit_diff_mean']:.2f}, IO>S {100 * summary['io_over_s_rate']:.1f}%, "
            f"IO prob {summary['io_prob_mean']:.2f}; p_ABC LD {summary['abc_logit_diff_mean']:.2f}.")
    paper_panel(ax_text, PAPER_BASELINE_TEXT + "\n\n" + ours)
    model_suptitle(fig, "Model performance on p_IOI (paper §2)", meta)
    return fig

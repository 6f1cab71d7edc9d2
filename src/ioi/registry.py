"""What the workflow computes and draws: every experiment and figure, as plain data.

This module imports nothing heavy, so the Snakefile can read it at parse time. Each experiment names
the function that runs it (``module:function``), the config key of its N, and the datasets it reads;
each figure names its experiment and the function that draws it. Figure names follow the paper's
figure numbers (``fig3b_...``) or the seed notebook's analysis (``logit_lens``, ``dla_head``, ...).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    name: str
    runner: str  # "module:function" taking (model, context) -> ExperimentResult
    n_key: str  # key of config["n"]
    datasets: tuple[str, ...] = ("ioi", "abc")
    section: str = ""
    description: str = ""
    gpu: int = 1  # can use one GPU
    mem_mb: int = 4000
    runtime_min: int = 30


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    name: str
    experiment: str
    plotter: str  # "module:function" taking (frame, summary, meta) -> matplotlib Figure
    caption: str
    category: str = "Section 3"


EXPERIMENTS: dict[str, ExperimentSpec] = {}
FIGURES: dict[str, FigureSpec] = {}


def experiment(name: str, runner: str, n_key: str, **kwargs) -> ExperimentSpec:
    spec = ExperimentSpec(name=name, runner=runner, n_key=n_key, **kwargs)
    EXPERIMENTS[name] = spec
    return spec


def figure(name: str, experiment_name: str, plotter: str, caption: str, category: str) -> FigureSpec:
    spec = FigureSpec(name, experiment_name, plotter, caption, category)
    FIGURES[name] = spec
    return spec


def resolve(target: str) -> Callable:
    """Import ``"package.module:function"``."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def figures_of(experiment_name: str) -> list[FigureSpec]:
    return [spec for spec in FIGURES.values() if spec.experiment == experiment_name]


# ------------------------------------------------------------------------------------------------
# The registry: every experiment and figure of the workflow.
# ------------------------------------------------------------------------------------------------
experiment("baseline", "ioi.experiments.baseline:baseline", "baseline", section="§2, Fig. 8",
           description="LD, IO probability, S>IO rate on p_IOI and p_ABC", mem_mb=4000, runtime_min=20)
experiment("example_prompts", "ioi.experiments.baseline:example_prompts", "baseline", datasets=(),
           section="seed notebook", description="LD on the seed's 8 example prompts", runtime_min=5)

figure("logit_diff_table", "example_prompts", "ioi.plots.baseline:logit_diff_table",
       "Seed notebook: logit difference IO - S on its 8 example prompts (BOS prepended).", "Seed notebook")
figure("baseline_logit_diff", "baseline", "ioi.plots.baseline:baseline_logit_diff",
       "Paper §2: distribution of the per-prompt logit difference on p_IOI and p_ABC, per template "
       "with 95% CIs, beside the paper's 3.56.", "Section 2")

# --- Logit attribution and head analyses (seed notebook; paper §3.1-3.2, App. F/H/I) -----------
# Runners: ioi.experiments.attribution, ioi.experiments.heads; plotters: ioi.plots.attribution,
# ioi.plots.heads.
experiment("logit_lens", "ioi.experiments.attribution:logit_lens", "patching", datasets=("ioi",),
           section="seed notebook (logit lens)",
           description="LD read off the accumulated residual stream at END, per prompt",
           mem_mb=4000, runtime_min=15)
experiment("dla", "ioi.experiments.attribution:dla", "patching", datasets=("ioi",),
           section="seed notebook; §3.1",
           description="Direct logit attribution at END per residual component and per head",
           mem_mb=4000, runtime_min=15)
experiment("attn_patterns", "ioi.experiments.attribution:attn_patterns", "patching", datasets=("ioi",),
           section="seed notebook (attention analysis)",
           description="Mean attention pattern (one template) of the top 3 positive / negative DLA heads",
           mem_mb=4000, runtime_min=15)
experiment("attention_summary", "ioi.experiments.heads:attention_summary", "scatter", datasets=("ioi",),
           section="§3.1, §3.2",
           description="Attention END->IO/S1/S2 and S2->S1/S1+1 of every head and per circuit class",
           mem_mb=4000, runtime_min=20)
experiment("fig3c", "ioi.experiments.heads:fig3c", "scatter", datasets=("ioi",),
           section="§3.1, Fig. 3c",
           description="Name movers: attention to a name vs. raw write along its unembedding",
           mem_mb=4000, runtime_min=20)
experiment("fig16", "ioi.experiments.heads:fig16", "scatter", datasets=("ioi",),
           section="App. F, Fig. 16",
           description="Backup name movers: attention to a name vs. raw write along its unembedding",
           mem_mb=4000, runtime_min=20)
experiment("copy_scores", "ioi.experiments.heads:copy_scores", "copy_score", datasets=("ioi",),
           section="§3.1",
           description="Copy score and negative copy score of every head (paper code definition)",
           mem_mb=6000, runtime_min=60)
experiment("repeated_tokens", "ioi.experiments.heads:repeated_tokens", "repeated_tokens", datasets=(),
           section="App. H/I, Figs. 17-18",
           description="Previous-token, duplicate, induction and next-token scores on repeated random tokens",
           mem_mb=4000, runtime_min=15)

figure("logit_lens", "logit_lens", "ioi.plots.attribution:logit_lens",
       "Seed notebook logit lens: at each prompt's END, the accumulated residual stream (n_pre = "
       "entering block n, n_mid = after its attention) through the final LayerNorm with the cached "
       "END scale, dotted with W_U[IO] - W_U[S] (+ b_U difference); mean over p_IOI with a 95% "
       "bootstrap CI, and the variant normalising each component by its own scale. The last point "
       "equals the model's LD (dashed line). The seed reports for GPT-2 small that nothing happens "
       "before layer 7 and most of the LD appears in attention layer 9; the paper's LD is 3.56.",
       "Seed notebook")
figure("dla_layer", "dla", "ioi.plots.attribution:dla_layer",
       "Seed notebook layer attribution: direct contribution of each residual component (embeddings, "
       "each attention layer incl. b_O, each MLP, the b_U difference) at END to logit(IO) - logit(S), "
       "final LN with the cached END scale; the components sum to the model's LD. Mean over p_IOI, "
       "95% bootstrap CIs. The seed reports for GPT-2 small that only attention layers matter.",
       "Seed notebook")
figure("dla_head", "dla", "ioi.plots.attribution:dla_head",
       "Direct logit attribution per head at END (head output z @ W_O without b_O, final LN with the "
       "cached END scale, dotted with W_U[IO] - W_U[S]); RdBu centred at 0, the circuit's name movers, "
       "backup and negative name movers outlined. Seed notebook / paper §3.1: 9.9, 9.6, 10.0 large "
       "positive; 10.7, 11.10 negative.", "Seed notebook")
figure("attn_patterns", "attn_patterns", "ioi.plots.attribution:attn_patterns",
       "Seed notebook attention analysis: mean attention pattern, over the prompts of the most frequent "
       "template (positions aligned), of the 3 most positive and 3 most negative DLA heads; IOI "
       "positions (IO, S1, S1+1, S2, END) marked. For GPT-2 small the seed and paper report that the "
       "name movers 9.9, 9.6 (10.0) and the negative heads 10.7, 11.10 attend from END to IO.",
       "Seed notebook")
figure("attention_summary", "attention_summary", "ioi.plots.heads:attention_summary",
       "Mean attention probability END->IO, END->S1, END->S2, S2->S1 and S2->S1+1 per circuit class "
       "(class mean per prompt, 95% bootstrap CI over prompts) and END->IO of every head. Paper §3.1: "
       "name movers END->IO 0.59; §3.2: S-inhibition heads END->S2 0.51 (black marks).", "Section 3")
figure("fig3c_attention_vs_projection", "fig3c", "ioi.plots.heads:fig3c",
       "Paper Fig. 3c: per prompt, a name mover's attention from END to IO (to S1 + S2) against the raw "
       "dot product of its END output with W_U[IO] (W_U[S]), no final LN; Pearson rho over the pooled "
       "IO and S points. The paper reports rho > 0.81 (N = 500).", "Section 3")
figure("fig16_backup_name_movers", "fig16", "ioi.plots.heads:fig16",
       "Paper Fig. 16: the Fig. 3c scatter for four backup name movers of the circuit (paper: 10.10, "
       "10.6, 10.2, 11.2; 10.10 name-mover-like, 10.2 writes IO and S equally); a circuit without "
       "backups shows its negative name movers, as the title says.", "Appendix")
figure("copy_scores", "copy_scores", "ioi.plots.heads:copy_scores",
       "Paper §3.1 copy score (paper code): blocks.0 resid_post at IO, S1, S2 -> block-1 ln1 -> W_V + "
       "b_V -> W_O (negated for the negative copy score) -> final LN -> unembed; the fraction of "
       "samples whose own name is in the top 5. Paper: name movers > 95%, negative name movers 98%, "
       "average head < 20% / 12%.", "Section 3")
figure("fig18_head_scores", "repeated_tokens", "ioi.plots.heads:fig18_head_scores",
       "Paper Fig. 18 on 100 random tokens repeated once (no BOS): duplicate token score (attention "
       "i -> i-100), previous token score (i -> i-1), induction score (i -> i-99), with the circuit's "
       "duplicate (paper 3.0, 0.1), previous token (4.11, 2.2) and induction (5.5, 6.9) heads "
       "outlined.", "Appendix")
figure("fig17_next_token", "repeated_tokens", "ioi.plots.heads:fig17_next_token",
       "Paper Fig. 17: mean raw contribution <z W_O, W_U[next token]> of each head on the second half "
       "of repeated random tokens, the 30 largest |values| in order, coloured by circuit class. Paper: "
       "induction heads 5.5 and 6.9 are among the 20 largest.", "Appendix")

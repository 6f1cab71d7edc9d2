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
    runtime_min: int = 30  # also the start order of the DAG: longest declared first
    # On a CPU, take every core (threads_per_job null): the one job that dominates the DAG
    # (completeness) then never shares the cores with another, and benchmarks/dag.py times the rest
    # apart from it; every other experiment takes half the cores (workflow/rules/experiments.smk).
    all_cores: bool = False


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    name: str
    experiment: str
    plotter: str  # "module:function" taking (frame, summary, meta) -> matplotlib Figure
    caption: str
    category: str = "Section 3"
    # Further experiments whose summary.json the plotter also reads (``extra={name: summary}``).
    extra_experiments: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PageSpec:
    """An interactive page: ``writer`` ``(frame, summary, meta) -> str`` (self-contained HTML)
    saved as ``figures/{model}/{name}.html`` beside the static figures."""

    name: str
    experiment: str
    writer: str  # "module:function"
    caption: str


EXPERIMENTS: dict[str, ExperimentSpec] = {}
FIGURES: dict[str, FigureSpec] = {}
PAGES: dict[str, PageSpec] = {}


def experiment(name: str, runner: str, n_key: str, **kwargs) -> ExperimentSpec:
    spec = ExperimentSpec(name=name, runner=runner, n_key=n_key, **kwargs)
    EXPERIMENTS[name] = spec
    return spec


def figure(name: str, experiment_name: str, plotter: str, caption: str, category: str,
           extra_experiments: tuple[str, ...] = ()) -> FigureSpec:
    spec = FigureSpec(name, experiment_name, plotter, caption, category, tuple(extra_experiments))
    FIGURES[name] = spec
    return spec


def page(name: str, experiment_name: str, writer: str, caption: str) -> PageSpec:
    spec = PageSpec(name, experiment_name, writer, caption)
    PAGES[name] = spec
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
           section="App. H (previous token, induction scores), App. I; Figs. 17-18",
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
       "IO and S points. Large panel: the plotted head, 9.9 for the paper circuit (the paper code's "
       "call; the circuit's first name mover otherwise); small panels: the other name movers (9.6, "
       "10.0). The paper reports rho > 0.81 (N = 500) for the plotted head.", "Section 3")
figure("fig16_backup_name_movers", "fig16", "ioi.plots.heads:fig16",
       "Paper Fig. 16: the Fig. 3c scatter for the backup name movers 10.10, 10.6, 10.2 and 11.2 (the "
       "paper's four, plotted for the paper circuit; 10.10 name-mover-like, 10.2 writes IO and S "
       "equally). Another circuit shows its first four backup name movers, or, without backups, its "
       "negative name movers; the heads plotted are named in the title and panels.", "Appendix")
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

# ------------------------------------------------------------------------------------------------
# Seed notebook: activation patching (denoising, S2 -> IO corruption, named per-prompt positions)
# ------------------------------------------------------------------------------------------------
_AP = "ioi.experiments.activation_figures"
_AP_PLOTS = "ioi.plots.activation_figures"
_AP_DEF = ("Denoising activation patching: the corrupted run (S2 replaced by IO) gets one clean "
           "activation at a time; cell = (LD - LD_corrupted) / (LD_clean - LD_corrupted). ")
for _name, _runtime in (("act_patch_resid_pre", 20), ("act_patch_block", 30), ("act_patch_head_out", 20),
                        ("act_patch_head_every", 40), ("act_patch_head_by_pos", 60)):
    experiment(_name, f"{_AP}:{_name}", "activation_patching", section="seed notebook",
               description=_AP_DEF.strip(), runtime_min=_runtime)
    figure(_name, _name, f"{_AP_PLOTS}:{_name}",
           _AP_DEF + {
               "act_patch_resid_pre": "Residual stream entering each layer, at each named position.",
               "act_patch_block": "resid_pre, attention output and MLP output of each layer, per named position.",
               "act_patch_head_out": "Each head's output (z) at every position.",
               "act_patch_head_every": "Each head's output, query, key, value and pattern, one at a time.",
               "act_patch_head_by_pos": "Each head's output / query / key / value / pattern at one named position.",
           }[_name], "Seed notebook")

# ------------------------------------------------------------------------------------------------
# Path patching figures (paper §3.1-3.4, App. C, D, F, J): heads -> logits / receiver inputs, knockouts
# Runners: ioi.experiments.path_figures; plotters: ioi.plots.path_figures. Values: the paper code's
# % change of the mean LD, 100 * (LD_patched - LD_clean) / LD_clean; x_new = p_ABC into x_orig =
# p_IOI; every head's z frozen to x_orig except the sender; MLPs and LayerNorms recomputed.
# ------------------------------------------------------------------------------------------------
_PP = "ioi.experiments.path_figures"
_PP_PLOTS = "ioi.plots.path_figures"
_PP_DEF = ("Path patching (x_new = p_ABC into x_orig = p_IOI; every other head's output frozen to "
           "p_IOI, MLPs and LayerNorms recomputed; value = % change of the mean logit difference "
           "relative to the clean LD, negative = the path supports the task; 95% bootstrap CIs over "
           "prompts in data.csv). ")
experiment("fig3b", f"{_PP}:fig3b", "patching", section="§3.1, Fig. 3b",
           description="PP each head -> logits, sender at END (and at every position)",
           mem_mb=4000, runtime_min=20)
experiment("fig4b", f"{_PP}:fig4b", "patching", section="§3.2, Fig. 4b",
           description="PP each head (END) -> name mover queries (END)", mem_mb=4000, runtime_min=20)
experiment("fig4c", f"{_PP}:fig4c", "patching", section="§3.2, Fig. 4c",
           description="Name mover attention from END before / after PP of all S-inhibition heads "
                       "-> name mover queries", mem_mb=4000, runtime_min=15)
experiment("fig5b", f"{_PP}:fig5b", "patching", section="§3.3, Fig. 5b",
           description="PP each head (S2) -> S-inhibition values (S2)", mem_mb=4000, runtime_min=20)
experiment("fig12b", f"{_PP}:fig12b", "patching", section="App. C, Fig. 12b",
           description="PP each head (S2) -> S-inhibition keys (S2)", mem_mb=4000, runtime_min=20)
experiment("fig13b", f"{_PP}:fig13b", "patching", section="§3.3, Fig. 13b",
           description="PP each head (S1+1) -> induction keys (S1+1)", mem_mb=4000, runtime_min=20)
experiment("fig15", f"{_PP}:fig15", "knockout", section="§3.4, App. F, Fig. 15",
           description="Name movers mean-ablated at END: LD ratio, PP heads -> logits before / after, "
                       "backup name mover candidates", mem_mb=6000, runtime_min=30)
experiment("fig19", f"{_PP}:fig19", "knockout", section="App. J, Fig. 19",
           description="LD after mean-ablating each MLP / all but MLP0; PP each MLP -> logits",
           mem_mb=6000, runtime_min=30)

figure("fig3b_path_patching_logits", "fig3b", f"{_PP_PLOTS}:fig3b",
       "Paper Fig. 3b. " + _PP_DEF + "Sender: each head's output z at END only (paper code "
       "positions=['end']); receiver: the final residual stream (logits). Small panel: the sender "
       "patched at every position (seed notebook). Name movers and negative name movers outlined. "
       "Paper §3.1: patching 9.6, 9.9 and 10.0 causes a large drop, 10.7 and 11.10 a large increase "
       "(no magnitudes in the text).", "Section 3")
figure("fig4b_path_patching_nm_queries", "fig4b", f"{_PP_PLOTS}:fig4b",
       "Paper Fig. 4b. " + _PP_DEF + "Sender: each head at END; receivers: the circuit's name "
       "movers' queries (hook_q) at END, recomputed in the frozen run and patched into a clean p_IOI "
       "run; grey: the sender is in the last receiver layer or later. S-inhibition heads outlined, "
       "receivers dashed. Paper §3.2: 7.3, 7.9, 8.6, 8.10 cause a significant drop (the S-inhibition "
       "heads).", "Section 3")
figure("fig4c_nm_attention", "fig4c", f"{_PP_PLOTS}:fig4c",
       "Paper Fig. 4c: the name movers' attention from END to IO, S1, S2 and the other positions "
       "(summed) on p_IOI, mean over prompts and name movers with std over prompts, before and after "
       "path patching all S-inhibition heads together (their z from p_ABC at END, every other head "
       "frozen to p_IOI, MLPs recomputed) -> the name movers' queries at END. Paper §3.2: patching "
       "leads to a greater probability on S1 (and thus less on IO).", "Section 3")
figure("fig5b_path_patching_sinh_values", "fig5b", f"{_PP_PLOTS}:fig5b",
       "Paper Fig. 5b. " + _PP_DEF + "Sender: each head at S2; receivers: the S-inhibition heads' "
       "values (hook_v) at S2. Induction and duplicate token heads outlined, receivers dashed. Paper "
       "§3.3: 4 heads with a significant negative effect, duplicate token 0.1, 3.0 and induction "
       "5.5, 6.9 (identities inferred from App. C/H).", "Section 3")
figure("fig12b_path_patching_sinh_keys", "fig12b", f"{_PP_PLOTS}:fig12b",
       "Paper Fig. 12b. " + _PP_DEF + "Sender: each head at S2; receivers: the S-inhibition heads' "
       "keys (hook_k) at S2. Induction and duplicate token heads outlined, receivers dashed. Paper "
       "App. C: 3.0 and 0.1 have the reverse effect of their value path; 5.8, 5.9 and 0.10 support "
       "the logit difference.", "Appendix")
figure("fig13b_path_patching_induction_keys", "fig13b", f"{_PP_PLOTS}:fig13b",
       "Paper Fig. 13b. " + _PP_DEF + "Sender: each head at S1+1; receivers: the keys (hook_k) at "
       "S1+1 of the induction heads 5.5 and 6.9 (paper App. D; the fuzzy induction heads 5.8, 5.9 "
       "are not receivers; option receivers='all_induction' adds them; a non-paper circuit uses all "
       "its induction heads, listed in the panel). Previous token heads outlined, receivers dashed. "
       "Paper §3.3: the two main heads decreasing the logit difference are 4.11 and 2.2.", "Section 3")
figure("fig15_backup_name_movers", "fig15", f"{_PP_PLOTS}:fig15",
       "Paper Fig. 15: the circuit's name movers mean-ablated at END (template-wise p_ABC means of "
       "hook_z) in every run; path patching each head (END) -> logits before (relative to the clean "
       "LD, = Fig. 3b) and after the knockout (relative to the knocked-out LD); heads ordered by "
       "|effect| after; backup candidates (stars; paper App. F's rule) = the heads in no other class "
       "of the circuit whose |effect| after exceeds 2%, by decreasing |effect|; the paper selects the "
       "first eight. Paper §3.4: only 5% drop in LD; "
       "10.7 even has a positive effect; backups 9.0, 9.7, 10.1, 10.2, 10.6, 10.10, 11.2, 11.9.",
       "Section 3")
figure("fig19_mlps", "fig19", f"{_PP_PLOTS}:fig19",
       "Paper Fig. 19: left, the logit difference after mean-ablating each MLP's output at every "
       "position (template-wise p_ABC means), and all MLPs except MLP0 together; right, path patching "
       "each MLP (END) -> logits with every head frozen, % change of LD. Paper App. J: the MLP0 "
       "knockout reverses the sign of the LD; all but MLP0 knocked out gives -1.1.", "Appendix")

# --- Circuit evaluation, signals, adversarial examples (paper §4, App. A, App. L, App. M) ------
# Runners: ioi.experiments.circuit_eval, ioi.experiments.signals; plotters: ioi.plots.circuit_eval,
# ioi.plots.signals. Knockouts: template-wise p_ABC means of every head's z, computed once per
# experiment; circuit heads kept at their relevant positions; MLPs never ablated.
_CE, _CE_PLOTS = "ioi.experiments.circuit_eval", "ioi.plots.circuit_eval"
_SG, _SG_PLOTS = "ioi.experiments.signals", "ioi.plots.signals"
experiment("faithfulness", f"{_CE}:faithfulness", "knockout", section="§4, §4.1, §4.3",
           description="F(M), F(C), F(C)/F(M) (ratio of means) and |F(M)-F(C)| for the circuit and the "
                       "naive circuit, per template and over 4 dataset seeds",
           mem_mb=6000, runtime_min=30)
experiment("completeness", f"{_CE}:completeness", "knockout", section="§4.1, §4.3, App. M, Fig. 6",
           description="(F(C\\K), F(M\\K)) for K = none, classes, random subsets and greedy search, for "
                       "the full and the naive circuit",
           mem_mb=6000, runtime_min=240, all_cores=True)
experiment("minimality", f"{_CE}:minimality", "knockout", section="§4.2, Figs. 7, 20",
           description="Minimality score |F(C\\(K u {v})) - F(C\\K)| of every circuit head",
           mem_mb=6000, runtime_min=60)
experiment("signals", f"{_SG}:signals", "patching", datasets=("ioi",), section="App. A, Figs. 9, 10",
           description="Patch the S-inhibition heads' END outputs from six token/position signal "
                       "datasets into p_IOI: LD per cell, linear fit, name mover attention",
           mem_mb=4000, runtime_min=20)
experiment("adversarial", f"{_SG}:adversarial", "adversarial", datasets=("ioi",),
           section="§4.4, App. L, Fig. 8",
           description="LD, IO prob., S>IO rate with a natural sentence naming IO (or S) inserted",
           mem_mb=4000, runtime_min=20)

figure("faithfulness", "faithfulness", f"{_CE_PLOTS}:faithfulness",
       "Paper §4.1/§4.3 faithfulness. F(M): mean LD (logit(IO) - logit(S) at END) of the model on "
       "p_IOI; F(C): the same with every head at every position mean-ablated (template-wise p_ABC "
       "means of z) except the circuit's heads at their relevant positions (END; S2 for induction and "
       "duplicate token heads; S1+1 for previous token heads); MLPs intact. Ratio = F(C)/F(M) as a "
       "ratio of means (paired bootstrap CI). Naive circuit: the paper's 13-head NAIVE (no backup, no "
       "negative name movers). Per-template ratios and the spread over 4 dataset seeds. Paper: "
       "|F(M)-F(C)| = 0.46, F(C)/F(M) = 87%; naive 0.1 (probably stale; released data 0.44).",
       "Section 4")
figure("fig6_completeness", "completeness", f"{_CE_PLOTS}:fig6_completeness",
       "Paper Fig. 6a/6b completeness. For each set K of circuit heads: x = F(C\\K) (K removed from the "
       "circuit, ablated at every position) and y = F(M\\K) (only K knocked out of the model, at its "
       "relevant positions); incompleteness |x - y|; a complete circuit lies on y = x. K = none, each "
       "class (the 'name mover' class includes the backup name movers, as in the paper code), random "
       "subsets, and a greedy search with the paper code's rule (completeness.py new_greedy_search, "
       "which produced Fig. 6: the best of the sampled candidates is added only if it raises the "
       "incompleteness above the current set's, starting from |F(C) - F(M)|; 10 runs; each run's "
       "FINAL set is plotted; the printed Algorithm 3, which always adds the best candidate and plots "
       "every intermediate set, is the named option greedy_rule='algorithm3'). Blue diamonds: the "
       "paper's four Fig. 22 greedy sets evaluated as given (paper circuit only). Hollow markers: the "
       "paper's released GPT-2 data (GPT-2-shaped models only). Paper: random and class K small; "
       "greedy up to 3.09 (87% of F(M)); the naive circuit also fails.", "Section 4")
figure("fig7_minimality", "minimality", f"{_CE_PLOTS}:fig7_minimality",
       "Paper Fig. 7 minimality: for each circuit head v and its set K(v) (paper Fig. 20), the score "
       "|F(C\\(K u {v})) - F(C\\K)| (K and v ablated at every position, template-wise p_ABC means) as "
       "a percentage of F(M), coloured by class, 95% paired bootstrap CIs; black diamonds: the paper's "
       "Fig. 20 scores / 3.56 (paper circuit on a GPT-2-shaped model only). Paper: every head at least "
       "1% of F(M); 9.0 and 11.9 the smallest.", "Section 4")
figure("fig20_minimality_table", "minimality", f"{_CE_PLOTS}:fig20_minimality_table",
       "Paper Fig. 20 as a table: each circuit head v, its class, K u {v}, our F(C\\(K u {v})), F(C\\K), "
       "score and % of F(M), and (paper circuit, GPT-2 shape) the paper's two F columns and % (score / "
       "3.56) beside ours. The paper's table comes from one N=100 run with F(C) = 2.62.", "Section 4")
figure("fig9_signals_table", "signals", f"{_SG_PLOTS}:fig9_signals_table",
       "Paper App. A, Fig. 9: the LD on p_IOI after activation patching the outputs (hook_z at END) of "
       "the circuit's S-inhibition heads from six datasets carrying an original / random / inverted "
       "(S<->IO) token signal and an original / inverted (IO<->S1) position signal; everything "
       "downstream recomputed. Ours (mean, 95% bootstrap CI) with the paper's values in each cell: "
       "3.55, -0.99, 2.45, -1.96, 1.77, -3.16; paper fit LD ~ 2.31 S_pos + 0.99 S_tok (7% error).",
       "Section 4")
figure("fig10_nm_attention", "signals", f"{_SG_PLOTS}:fig10_nm_attention",
       "Paper App. A, Fig. 10: mean attention of the circuit's name movers from END to IO, S1 and S2 "
       "(std over prompts) before and after patching the S-inhibition heads from (a) the random-token "
       "dataset (positions kept) and (b) the dataset with S2 replaced by IO (both signals inverted). "
       "Paper (qualitative): in (b) the name movers attend to S1 instead of IO; (a) is partial.",
       "Section 4")
figure("fig8_adversarial_table", "adversarial", f"{_SG_PLOTS}:fig8_adversarial_table",
       "Paper §4.4, Fig. 8: LD, IO probability and fraction of prompts with logit(S) > logit(IO) on "
       "p_IOI and with one or two natural sentences naming IO (or S, the control) inserted after the "
       "first clause (App. L's five sentences), ours with 95% bootstrap CIs. The paper's values "
       "(3.55/0.49/0.7%, S: 3.64/0.59/0.4%, IO: 1.23/0.36/23.4%) sit beside the two-sentence rows: "
       "the paper code's final call (advex.py, DOUBLE_ADX_TEMPLATE), which the claims compare; the "
       "one-sentence rows (the paper's App. L example) are the named alternative.",
       "Section 4")

# --- Edge-level circuits (issue 12): attribution, discovery, scoring against ground truth ------
# Runner: ioi.experiments.edges; plotters: ioi.plots.edges. Graph: senders embed / heads / MLPs,
# receivers head q/k/v inputs / MLP inputs / logits; p_ABC into p_IOI; metric = mean LD at END.
_ED, _ED_PLOTS = "ioi.experiments.edges", "ioi.plots.edges"
experiment("edge_circuits", f"{_ED}:edge_circuits", "edges", section="issue 12 (after §3, Fig. 2)",
           description="EAP and EAP-IG edge scores, ACDC with exact edge patching, top-n / threshold "
                       "circuits; faithfulness curves, head overlap with the hand-found circuit, and "
                       "(planted model) ROC AUC against the planted edges",
           mem_mb=6000, runtime_min=240)
figure("edges_roc", "edge_circuits", f"{_ED_PLOTS}:edges_roc",
       "ROC curves of edge rankings against the planted circuit's edges (ioi.planted.CIRCUIT_EDGES, "
       "derived from how the weights are built): EAP and EAP-IG (embedding interpolated in 5 steps) "
       "scores for p_ABC patched into p_IOI, metric = mean logit difference, edges ranked by |score|; "
       "ACDC's circuit (exact edge patching, tau = 1% of the clean LD) as one point. Only a model "
       "whose circuit is known edge by edge has an ROC; for other models the panel says so.",
       "Edge-level circuits")
figure("edges_faithfulness", "edge_circuits", f"{_ED_PLOTS}:edges_faithfulness",
       "Faithfulness curve: (LD(C) - LD(empty)) / (LD(clean) - LD(empty)) with the top-k edges by "
       "|EAP| or |EAP-IG| kept clean and every other edge patched from p_ABC (exact edge patching), "
       "k at MIB's fractions of the edges, with its area (CPR) and the area of |1 - f| (CMD) as in "
       "EAP-IG / MIB; every found circuit (ACDC, top-n, threshold) as a marker.",
       "Edge-level circuits")
figure("edges_graph_acdc", "edge_circuits", f"{_ED_PLOTS}:edges_graph_acdc",
       "The circuit found by ACDC with exact edge patching, drawn like the paper's Fig. 2: heads by "
       "layer, coloured by the hand-found circuit's class (the planted heads, or the paper's 26 for "
       "GPT-2), one arrow per edge styled by the receiver's input (query, key, value); its head "
       "overlap with the hand-found circuit by class.", "Edge-level circuits")
figure("edges_graph_eap_ig", "edge_circuits", f"{_ED_PLOTS}:edges_graph_eap_ig",
       "The top-n edges by |EAP-IG| (n = the planted circuit's size, or 1% of the edges where no "
       "ground truth exists), drawn like the paper's Fig. 2 (as the ACDC figure).",
       "Edge-level circuits")

# --- The paper's remaining experiments (§3.3, App. A, App. D) -----------------------------------
# Runners: ioi.experiments.position_signals, ioi.experiments.path_figures; plotters:
# ioi.plots.position_signals, ioi.plots.path_figures.
_PS, _PS_PLOTS = "ioi.experiments.position_signals", "ioi.plots.position_signals"
experiment("position_signal", f"{_PS}:position_signal", "patching", datasets=("ioi",),
           section="§3.3 (locating the position signal)",
           description="Patch the induction + duplicate token heads (S2) and the S-inhibition heads "
                       "(END) from each signal-specific dataset; ratio of the LD drops",
           mem_mb=4000, runtime_min=20)
experiment("pointer_arithmetic", f"{_PS}:pointer_arithmetic", "patching", datasets=("ioi",),
           section="App. A (pointer arithmetic)",
           description="Patch the S-inhibition heads' END outputs from p_IOI with longer prefixes",
           mem_mb=4000, runtime_min=10)
experiment("induction_queries", f"{_PP}:induction_queries", "patching", section="App. D",
           description="PP each head -> induction heads' queries at S2 (no significant effect)",
           mem_mb=4000, runtime_min=30)
experiment("sinh_queries", f"{_PP}:sinh_queries", "patching", section="§3.3",
           description="PP each head -> S-inhibition heads' queries at END (no significant effect)",
           mem_mb=4000, runtime_min=30)

figure("position_signal", "position_signal", f"{_PS_PLOTS}:position_signal",
       "Paper §3.3, locating the position signal: the drop in logit difference (clean - patched, mean "
       "over p_IOI, 95% bootstrap CI) after activation patching (a) the S-inhibition heads' hook_z at "
       "END and (b) the induction and duplicate token heads' hook_z at S2 from each signal-specific "
       "dataset of Fig. 9 (everything downstream recomputed), and the ratio (b)/(a) of the mean drops "
       "(n/a where (a) moves the LD by < 5% of the clean LD). Paper: >= 88% from the altered-position "
       "datasets (ours: the three inverted-position ones), < 8% from the same-position, "
       "different-token one (ours: random names, positions kept).", "Section 3")
figure("pointer_arithmetic", "pointer_arithmetic", f"{_PS_PLOTS}:pointer_arithmetic",
       "Paper App. A, pointer arithmetic: the LD on p_IOI before and after activation patching the "
       "S-inhibition heads' hook_z, taken at END of the same prompts with the paper code's longer "
       "prefixes (flip_prefixes: absolute positions shift, the S1-S2 distance is kept), into p_IOI's "
       "END; and the LD on the long-prefix prompts themselves. Mean with 95% bootstrap CIs; paper "
       "3.56 before, 3.57 after (black diamonds, GPT-2 small).", "Section 3")
figure("induction_queries", "induction_queries", f"{_PP_PLOTS}:induction_queries",
       "Paper App. D, query composition at S2. " + _PP_DEF + "Sender: each head at S2; receivers: "
       "the induction heads' queries (hook_q) at S2 (5.5 and 6.9 for the paper circuit, the receivers "
       "of Fig. 13b; the circuit's induction heads otherwise), dashed. Paper: no significant effect; "
       "the claim compares the largest |effect| with Fig. 13b's.", "Appendix")
figure("sinh_queries", "sinh_queries", f"{_PP_PLOTS}:sinh_queries",
       "Paper §3.3, S-inhibition queries. " + _PP_DEF + "Sender: each head at END; receivers: the "
       "S-inhibition heads' queries (hook_q) at END, dashed; grey: the sender is in the last receiver "
       "layer or later. Paper: no significant effect (the S-inhibition heads read the position and "
       "token signals through their values and keys at S2); the claim compares the largest |effect| "
       "with Fig. 5b's.", "Section 3")

# --- §4 of issue 10: every headline number per template and per order --------------------------
BREAKDOWN_EXPERIMENTS = ("faithfulness", "copy_scores", "signals", "position_signal", "pointer_arithmetic")
figure("breakdown_by_template", "baseline", "ioi.plots.breakdown:breakdowns",
       "Every headline number per template and per order (ABBA / BABA), from each experiment's "
       "summary['breakdown'] (ioi.breakdown): baseline LD and IO probability, F(M), F(C), F(C)/F(M) "
       "(ratio of means within the group, paired bootstrap CI), the name movers' copy scores (Wilson "
       "CIs), the Fig. 9 cells, the §3.3 ratios and the pointer-arithmetic LD; 95% CIs; dashed line: "
       "all prompts. A single faithfulness number hides a wide spread across templates. Path-patching "
       "top heads per template are in paper_comparison.md's secondary table.", "Section 4",
       extra_experiments=BREAKDOWN_EXPERIMENTS)

# --- Interactive pages (figures/{model}/{page}.html, self-contained: no network needed) ---------
experiment("class_attention_patterns", "ioi.experiments.interactive:class_attention_patterns", "patching",
           datasets=("ioi",), section="seed notebook (attention analysis, circuitsvis)",
           description="Attention patterns of every circuit head (template mean and one prompt)",
           mem_mb=4000, runtime_min=15)
page("attention_patterns_interactive", "class_attention_patterns", "ioi.plots.interactive:attention_patterns_html",
     "Interactive attention patterns (circuitsvis AttentionHeads, its JavaScript inlined) of every head of the "
     "circuit, named with its class: the mean over the prompts of the most frequent template and one "
     "prompt with its own tokens.")

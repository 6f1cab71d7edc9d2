"""Path-patching figures of the paper (§3.1-3.4, App. G, J; Figs. 3b, 4b, 4c, 5b, 12b, 13b, 15, 19).

Every experiment patches from ``x_new`` = p_ABC (``ctx.abc``) into ``x_orig`` = p_IOI (``ctx.ioi``),
position-aligned prompt by prompt, and reports the paper code's "% change in logit difference"
``100 * (LD_patched - LD_clean) / LD_clean`` (mean LD over prompts; equal to the mean of the
paired per-prompt changes ``100 * (LD_patched_i - LD_clean_i) / mean LD_clean``, whose 95% bootstrap
CIs over prompts are stored beside each value).
A head whose path supports the task shows a *negative* value (patching it lowers LD).

Definitions (path patching as :mod:`ioi.patching.path`: every head's ``z`` frozen to ``x_orig``
except the sender, patched from ``x_new`` at the sender positions; MLPs and LayerNorms recomputed;
receiver inputs recorded and patched into a clean ``x_orig`` run at the receiver positions):

* ``fig3b``: each head -> logits (final residual stream), sender at END (paper code
  ``positions=["end"]``); variant ``all_positions``: sender patched at every position (the seed
  notebook's ``get_path_patch_head_to_final_resid_post``).
* ``fig4b``: each head at END -> the circuit's name movers' queries at END.
* ``fig4c``: all S-inhibition heads together (at END) -> the name movers' queries at END; the name
  movers' attention from END to IO / S1 / S2 / the other positions before and after
  (:func:`patch_senders_to_receiver_inputs`, explicit hooks on the bridge).
* ``fig5b`` / ``fig12b``: each head at S2 -> the S-inhibition heads' values / keys at S2.
* ``fig13b``: each head at S1+1 -> the induction heads' keys at S1+1. Receivers (App. D; the seed /
  ARENA bonus ``[(5, 5), (6, 9)]``): for the paper circuit the two validated induction heads 5.5
  and 6.9 only (default ``receivers="paper"``); ``receivers="all_induction"`` adds the fuzzy
  induction heads 5.8 and 5.9 (their key paths too, which can reorder the top two). A circuit other
  than the paper's has no fuzzy/validated split: all its induction heads.
* ``induction_queries`` (App. D): each head at S2 -> the induction heads' queries at S2 (5.5, 6.9
  for the paper circuit); ``sinh_queries`` (§3.3): each head at END -> the S-inhibition heads'
  queries at END. The paper finds no significant effect on either; ``max_abs_effect`` is the
  largest |% change| of any sender (the null claims read it).
* Every sweep also reports its top heads per template and per order (``summary["breakdown"]``,
  :func:`ioi.breakdown.breakdown_heads`).
* ``fig15``: the name movers mean-ablated at END (template-wise p_ABC means); the LD ratio
  knocked-out / clean, and fig3b's heads -> logits before and after the knockout (the knockout
  applied in every run; "after" relative to the knocked-out LD, as the paper code's
  ``extra_hooks``); the backup name movers follow the paper's rule (App. F): the heads that are
  in no other class of the circuit (any class but "backup name mover") whose effect after the
  knockout has size above ``BACKUP_THRESHOLD_PERCENT`` = 2% (|% change in LD| > 2), ordered by
  decreasing |effect| (``backup_candidates``); the paper selects eight of them
  (``backup_selected``: the first ``N_BACKUP_SELECTED``).
* ``fig19``: each MLP mean-ablated alone at every position (template-wise p_ABC means), all MLPs
  but MLP0 together, and path patching each MLP -> logits at END.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ioi.ablation import Ablation, compute_template_means, evaluate_ablations, head_knockout, mlp_knockout
from ioi.analysis._common import model_device
from ioi.breakdown import breakdown_heads, group_labels
from ioi.analysis.attention import pattern_hook_name
from ioi.circuits import Circuit
from ioi.experiments.attribution import (
    ci,
    circuit_summary,
    finite,
    head_key,
    per_head_dict,
)
from ioi.experiments.core import ExperimentResult, RunContext, batch_size_for
from ioi.forward import end_logits
from ioi.metrics import LogitDiff, logit_diff_from_end_logits
from ioi.patching.path import path_patch_to_heads, path_patch_to_logits, positions_mask
from ioi.stats import bootstrap_ratio_ci

Head = tuple[int, int]

N_BOOTSTRAP = 1000
TOP_K = 5
# Backup name movers (paper App. F): "the eight heads that were not part of any other groups, and
# affected the logit difference with an effect size above the threshold of 2%".
BACKUP_THRESHOLD_PERCENT = 2.0
N_BACKUP_SELECTED = 8
BACKUP_CLASS = "backup name mover"
KEY_POSITIONS = ("IO", "S1", "S2", "other")

__all__ = [
    "fig3b",
    "fig4b",
    "fig4c",
    "fig5b",
    "fig12b",
    "fig13b",
    "induction_queries",
    "sinh_queries",
    "fig15",
    "fig19",
    "backup_name_movers",
    "logit_diffs",
    "patch_senders_to_receiver_inputs",
]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _pair(ctx: RunContext, model) -> tuple[torch.Tensor, torch.Tensor]:
    """p_IOI / p_ABC tokens on the model's device (position-aligned, same shape)."""
    device = model_device(model)
    orig, new = ctx.ioi.toks.to(device), ctx.abc.toks.to(device)
    if orig.shape != new.shape:
        raise ValueError(f"p_IOI {tuple(orig.shape)} and p_ABC {tuple(new.shape)} are not aligned.")
    return orig, new


def _slice_ablation(ablation: Ablation | None, rows: slice) -> Ablation | None:
    if ablation is None:
        return None
    return Ablation(
        head_keep=None if ablation.head_keep is None else ablation.head_keep[rows],
        head_means=None if ablation.head_means is None else ablation.head_means[rows],
        mlp_keep=None if ablation.mlp_keep is None else ablation.mlp_keep[rows],
        mlp_means=None if ablation.mlp_means is None else ablation.mlp_means[rows],
    )


@torch.no_grad()
def logit_diffs(model, dataset, memory_budget_mb: int, ablation: Ablation | None = None) -> np.ndarray:
    """Per-prompt LD at END (``float64[N]``) with an optional mean ablation, in memory-bounded
    chunks (the ablation's rows are sliced with the prompts)."""
    device = model_device(model)
    toks = dataset.toks.to(device)
    end, io, s = dataset.word_idx["END"], dataset.io_token_ids, dataset.s_token_ids
    step = batch_size_for(model, toks.shape[1], memory_budget_mb)
    out = []
    for start in range(0, toks.shape[0], step):
        rows = slice(start, start + step)
        part = _slice_ablation(ablation, rows)
        hooks = ()
        if part is not None:
            part.check_shape(*toks[rows].shape)
            hooks = part.hooks()
        at_end = end_logits(model, toks[rows], end[rows], fwd_hooks=hooks, memory_budget_mb=None)
        out.append(logit_diff_from_end_logits(at_end, io[rows], s[rows]).double())
    return torch.cat(out).numpy()


def knockout_logit_diffs(model, dataset, memory_budget_mb: int, ablations: Sequence[Ablation]) -> np.ndarray:
    """Per-prompt LD at END (``float64[k, N]``) under each ablation: the batched knockout engine
    (:func:`ioi.ablation.evaluate_ablations`), many ablations per pass."""
    metric = LogitDiff.from_dataset(dataset, per_prompt=True)
    values = evaluate_ablations(model, dataset.toks, metric, ablations, memory_budget_mb=memory_budget_mb)
    return torch.stack([v.detach().double().cpu() for v in values]).numpy()


def _ld_metric(dataset) -> LogitDiff:
    """Raw per-prompt LD at END (the patched runs' LD, turned into paired % changes below)."""
    return LogitDiff.from_dataset(dataset, per_prompt=True)


def _percent_change(patched: torch.Tensor, base: np.ndarray) -> np.ndarray:
    """Paired per-prompt % change ``100 * (LD_patched[..., i] - LD_base[i]) / mean(LD_base)``.

    Its mean over prompts is the paper code's ``100 * (mean LD_patched - mean LD_base) / mean
    LD_base`` exactly; per prompt it is paired with the prompt's own baseline, so the bootstrap CI
    over prompts reflects the patch, not the spread of the per-prompt LD (the denominator is the
    full-sample mean, held fixed)."""
    values = patched.detach().double().cpu().numpy()
    return 100.0 * (values - base) / base.mean()


def _head_stats(values: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over prompts and 95% bootstrap CI of ``values [L, H, N]`` (NaN senders stay NaN).

    The CI of each head is :func:`ioi.experiments.attribution.ci`'s (percentile bootstrap of the
    mean, ``N_BOOTSTRAP`` resamples drawn with ``seed``: the same resampled prompts for every
    head), computed for all heads at once from that one index draw (the same numbers; tested)."""
    L, H = values.shape[:2]
    mean = np.full((L, H), np.nan)
    low, high = np.full((L, H), np.nan), np.full((L, H), np.nan)
    flat = np.asarray(values, dtype=float).reshape(L * H, -1)
    cells = np.flatnonzero(np.isfinite(flat).all(axis=1))
    for cell in cells:
        mean.flat[cell] = flat[cell].mean()
    n = flat.shape[1]
    if n < 2 or not len(cells):
        return mean, low, high
    idx = np.random.default_rng(seed).integers(0, n, size=(N_BOOTSTRAP, n))  # as bootstrap_ci draws
    alpha = (1 - 0.95) / 2
    # one head at a time: numpy sums a 2-D [N_BOOTSTRAP, N] gather row by row exactly as
    # bootstrap_ci's per-resample np.mean does (a 3-D gather would sum in another order)
    stats = np.stack([flat[cell][idx].mean(axis=-1) for cell in cells])  # [heads, N_BOOTSTRAP]
    lo, hi = np.quantile(stats, [alpha, 1 - alpha], axis=1)
    for j, cell in enumerate(cells):
        low.flat[cell] = lo[j] if np.isfinite(lo[j]) else np.nan
        high.flat[cell] = hi[j] if np.isfinite(hi[j]) else np.nan
    return mean, low, high


def _ci_dict(low: np.ndarray, high: np.ndarray) -> dict[str, list[float | None]]:
    return {head_key(l, h): [finite(low[l, h]), finite(high[l, h])]
            for l in range(low.shape[0]) for h in range(low.shape[1])}


def _head_frame(mean, low, high, variant: str, circuit: Circuit, n: int) -> pd.DataFrame:
    L, H = mean.shape
    layers, heads = np.repeat(np.arange(L), H), np.tile(np.arange(H), L)
    return pd.DataFrame({
        "layer": layers,
        "head": heads,
        "head_label": [f"L{l}H{h}" for l, h in zip(layers, heads)],  # "10.1" vs "10.10" survive CSV
        "class": [circuit.class_of((int(l), int(h))) or "other" for l, h in zip(layers, heads)],
        "variant": variant,
        "value": mean.ravel(),
        "ci_low": low.ravel(),
        "ci_high": high.ravel(),
        "n_prompts": n,
    })


def _ranked(mean: np.ndarray, k: int, *, largest: bool, exclude: set[str] = frozenset()) -> list[str]:
    """The ``k`` heads with the largest (or most negative) finite values, as ``"layer.head"``."""
    L, H = mean.shape
    cells = [(mean[l, h], head_key(l, h)) for l in range(L) for h in range(H)
             if np.isfinite(mean[l, h]) and head_key(l, h) not in exclude]
    cells.sort(key=lambda c: -c[0] if largest else c[0])
    return [name for _, name in cells[:k]]


def _shape(model, circuit: Circuit) -> dict[str, Any]:
    return {"n_layers": int(model.cfg.n_layers), "n_heads": int(model.cfg.n_heads),
            "circuit": circuit_summary(circuit)}


def _class_heads(circuit: Circuit, cls: str) -> list[Head]:
    heads = [tuple(h) for h in circuit.classes.get(cls, ())]
    if not heads:
        raise ValueError(f"Circuit {circuit.name!r} has no {cls!r} heads (needed as receivers).")
    return heads


def _clean(model, ctx: RunContext) -> tuple[np.ndarray, dict[str, Any]]:
    ld = logit_diffs(model, ctx.ioi, ctx.memory_budget_mb)
    if ld.mean() == 0:
        raise ValueError("The clean logit difference is 0: a % change relative to it is undefined.")
    return ld, {"clean_logit_diff": finite(ld.mean()), "clean_logit_diff_ci": ci(ld, ctx.seed)}


def _max_abs_effect(mean: np.ndarray) -> dict[str, Any]:
    """The largest |% change| over the reachable senders, and which head it is (null claims)."""
    finite_cells = np.where(np.isfinite(mean), np.abs(mean), -np.inf)
    if not np.isfinite(finite_cells).any():
        return {"max_abs_effect": None, "max_abs_effect_head": None}
    layer, head = np.unravel_index(int(np.argmax(finite_cells)), mean.shape)
    return {"max_abs_effect": finite(finite_cells[layer, head]), "max_abs_effect_head": head_key(layer, head)}


def _head_breakdown(values: torch.Tensor, ld: np.ndarray, ctx: RunContext, order: str = "negative") -> dict[str, Any]:
    """Per template / per order: the top heads of a sweep (``values [L, H, N]`` patched LDs)."""
    return breakdown_heads(values.detach().double().cpu().numpy(), ld, group_labels(ctx.ioi), k=TOP_K,
                           order=order, seed=ctx.seed,
                           definition="% change of the group's mean LD, 100 (mean_g LD_patched - "
                                      "mean_g LD_clean) / mean_g LD_clean; top heads "
                                      + ("by |effect|" if order == "abs" else "most negative first"))


def _effect_summary(mean, low, high, prefix: str = "effect") -> dict[str, Any]:
    return {
        prefix: per_head_dict(mean),
        f"{prefix}_ci_by_head": _ci_dict(low, high),  # not "_ci": that is a [low, high] pair
        f"{prefix}_top_negative": _ranked(mean, TOP_K, largest=False),
        f"{prefix}_top_positive": _ranked(mean, TOP_K, largest=True),
    }


# ------------------------------------------------------------------------------------------------
# Heads -> logits (Fig. 3b) and heads -> receiver inputs (Figs. 4b, 5b, 12b, 13b)
# ------------------------------------------------------------------------------------------------


def fig3b(model, ctx: RunContext) -> ExperimentResult:
    """PP each head -> logits: sender at END (paper code) and at every position (seed notebook)."""
    circuit = ctx.circuit_for(model)
    orig, new = _pair(ctx, model)
    ld, clean = _clean(model, ctx)
    metric = _ld_metric(ctx.ioi)
    frames, summary = [], {}
    for variant, positions, prefix in (("end", ctx.ioi.word_idx["END"], "effect"),
                                       ("all_positions", None, "effect_all_positions")):
        values = path_patch_to_logits(model, orig, new, metric, sender_positions=positions,
                                      progress=ctx.progress, memory_budget_mb=ctx.memory_budget_mb)
        mean, low, high = _head_stats(_percent_change(values, ld), ctx.seed)
        frames.append(_head_frame(mean, low, high, variant, circuit, len(ld)))
        summary.update(_effect_summary(mean, low, high, prefix))
        if variant == "end":
            summary["breakdown"] = {"effect": _head_breakdown(values, ld, ctx, order="abs")}
    # With every other head frozen nothing moves information between positions (MLPs and LNs act
    # per position), so only the sender's change at END reaches the logits read at END: the two
    # variants agree up to float rounding. Recorded to show it.
    end_vals = frames[0]["value"].to_numpy()
    all_vals = frames[1]["value"].to_numpy()
    summary["all_positions_max_abs_difference"] = finite(np.nanmax(np.abs(end_vals - all_vals)))
    summary.update(clean)
    summary.update(_shape(model, circuit))
    summary.update({"receiver": "logits (final residual stream)", "sender_position": "END",
                    "variants": ["end", "all_positions"], "unit": "% change in logit difference"})
    meta = {"definition": "path patching head -> final residual stream (ioi.patching.path."
                          "path_patch_to_logits), x_new = p_ABC into x_orig = p_IOI; variant 'end': "
                          "sender z patched at END only (paper code positions=['end']); "
                          "'all_positions': at every position (seed notebook); value = 100 * "
                          "(LD - LD_clean) / LD_clean"}
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary, meta)


def _to_receivers(model, ctx: RunContext, *, receiver_class: str, receiver_input: str,
                  position: str, paper: str, receivers: Sequence[Head] | None = None) -> ExperimentResult:
    circuit = ctx.circuit_for(model)
    receivers = (_class_heads(circuit, receiver_class) if receivers is None
                 else [tuple(map(int, h)) for h in receivers])
    orig, new = _pair(ctx, model)
    ld, clean = _clean(model, ctx)
    metric = _ld_metric(ctx.ioi)
    pos = ctx.ioi.word_idx[position]
    values = path_patch_to_heads(model, orig, new, metric, receivers, receiver_input,
                                 sender_positions=pos, receiver_positions=pos,
                                 progress=ctx.progress, memory_budget_mb=ctx.memory_budget_mb)
    mean, low, high = _head_stats(_percent_change(values, ld), ctx.seed)
    frame = _head_frame(mean, low, high, position, circuit, len(ld))
    frame["receiver"] = frame["head_label"].isin([f"L{l}H{h}" for l, h in receivers])
    summary = {
        **_effect_summary(mean, low, high),
        **_max_abs_effect(mean),
        "breakdown": {"effect": _head_breakdown(values, ld, ctx)},
        **clean,
        **_shape(model, circuit),
        "receivers": [head_key(*h) for h in receivers],
        "receiver_class": receiver_class,
        "receiver_input": receiver_input,
        "sender_position": position,
        "receiver_position": position,
        "unit": "% change in logit difference",
        "n_unreachable": int((~np.isfinite(mean)).sum()),
    }
    meta = {"definition": f"path patching head (at {position}) -> {receiver_input} of the "
                          f"{receiver_class} heads at {position} (ioi.patching.path."
                          "path_patch_to_heads), x_new = p_ABC into x_orig = p_IOI; value = "
                          "100 * (LD - LD_clean) / LD_clean; NaN: the sender is in the last "
                          "receiver layer or later", "paper": paper}
    return ExperimentResult(frame, summary, meta)


def fig4b(model, ctx: RunContext) -> ExperimentResult:
    """PP each head (END) -> the name movers' queries (END)."""
    return _to_receivers(model, ctx, receiver_class="name mover", receiver_input="q", position="END",
                         paper="§3.2, Fig. 4b")


def fig5b(model, ctx: RunContext) -> ExperimentResult:
    """PP each head (S2) -> the S-inhibition heads' values (S2)."""
    return _to_receivers(model, ctx, receiver_class="s-inhibition", receiver_input="v", position="S2",
                         paper="§3.3, Fig. 5b")


def fig12b(model, ctx: RunContext) -> ExperimentResult:
    """PP each head (S2) -> the S-inhibition heads' keys (S2)."""
    return _to_receivers(model, ctx, receiver_class="s-inhibition", receiver_input="k", position="S2",
                         paper="App. C, Fig. 12b")


# App. D patches into the keys of the induction heads validated in App. H (5.5, 6.9) at S1+1; the
# fuzzy induction heads 5.8, 5.9 (App. C) are receivers only with receivers="all_induction".
FIG13B_PAPER_RECEIVERS: tuple[Head, ...] = ((5, 5), (6, 9))
FIG13B_RECEIVER_CHOICES = ("paper", "all_induction")


def fig13b_receivers(circuit: Circuit, receivers: str | Sequence[Head] = "paper") -> list[Head]:
    """Receivers of Fig. 13b: ``"paper"`` (default) = 5.5 and 6.9 for the paper circuit (App. D),
    every induction head for any other circuit; ``"all_induction"`` = every induction head of the
    circuit (for the paper's: 5.5, 5.8, 5.9, 6.9); or an explicit list of heads."""
    induction = _class_heads(circuit, "induction")
    if not isinstance(receivers, str):
        return [tuple(map(int, h)) for h in receivers]
    if receivers not in FIG13B_RECEIVER_CHOICES:
        raise ValueError(f"fig13b receivers={receivers!r}: use one of {list(FIG13B_RECEIVER_CHOICES)} "
                         "or a list of (layer, head).")
    if receivers == "paper" and circuit.name == "paper":
        return [h for h in FIG13B_PAPER_RECEIVERS if h in induction]
    return induction


def fig13b(model, ctx: RunContext, receivers: str | Sequence[Head] = "paper") -> ExperimentResult:
    """PP each head (S1+1) -> the induction heads' keys (S1+1); receivers from
    :func:`fig13b_receivers` (default: the paper's 5.5 and 6.9)."""
    circuit = ctx.circuit_for(model)
    chosen = fig13b_receivers(circuit, receivers)
    result = _to_receivers(model, ctx, receiver_class="induction", receiver_input="k", position="S1+1",
                           paper="§3.3, App. D, Fig. 13b", receivers=chosen)
    result.summary["receiver_choice"] = receivers if isinstance(receivers, str) else "explicit"
    result.summary["receiver_note"] = (
        "paper App. D: keys of the induction heads 5.5 and 6.9 at S1+1 (fuzzy 5.8, 5.9 excluded; "
        "receivers='all_induction' includes them)" if circuit.name == "paper" else
        "every induction head of the circuit (no fuzzy/validated split outside the paper circuit)")
    return result


def induction_receivers(circuit: Circuit) -> list[Head]:
    """Receivers of the induction-query figure: those of Fig. 13b (:func:`fig13b_receivers`'s
    default: 5.5 and 6.9 for the paper circuit, App. D; the circuit's induction heads otherwise)."""
    return fig13b_receivers(circuit, "paper")


def induction_queries(model, ctx: RunContext) -> ExperimentResult:
    """PP each head (S2) -> the induction heads' queries (S2): App. D's query composition at S2,
    where the paper "did not find any significant effect"."""
    circuit = ctx.circuit_for(model)
    return _to_receivers(model, ctx, receiver_class="induction", receiver_input="q", position="S2",
                         paper="App. D (query composition at S2; no significant effect)",
                         receivers=induction_receivers(circuit))


def sinh_queries(model, ctx: RunContext) -> ExperimentResult:
    """PP each head (END) -> the S-inhibition heads' queries (END): the §3.3 query path with no
    significant effect (the S-inhibition heads' inputs that matter are their values and keys at S2)."""
    return _to_receivers(model, ctx, receiver_class="s-inhibition", receiver_input="q", position="END",
                         paper="§3.3 (S-inhibition queries; no significant effect)")


# ------------------------------------------------------------------------------------------------
# Several senders at once -> receiver inputs, with attention (Fig. 4c)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_senders_to_receiver_inputs(
    model,
    orig_toks: torch.Tensor,
    new_toks: torch.Tensor,
    senders: Sequence[Head],
    receivers: Sequence[Head],
    *,
    receiver_input: str = "q",
    sender_positions=None,
    receiver_positions=None,
    query_positions: torch.Tensor,
    answer_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    pattern_heads: Sequence[Head] | None = None,
    memory_budget_mb: int = 2048,
    progress: bool = False,
) -> dict[str, Any]:
    """Path patching of a *set* of senders together -> receiver inputs, returning attention.

    Step 2: ``x_orig`` run with every head's ``hook_z`` frozen to its ``x_orig`` value except the
    ``senders``, whose ``z`` comes from ``x_new`` at ``sender_positions`` (MLPs and LayerNorms
    recomputed); the receivers' ``hook_{receiver_input}`` are recorded. Step 3: a normal ``x_orig``
    run whose receivers' inputs are replaced by the recorded ones at ``receiver_positions``.

    Returns ``{"before": {head: [N, seq]}, "after": {...}}``: the attention pattern rows of
    ``pattern_heads`` (default: the receivers) from each prompt's ``query_positions`` (e.g. END)
    in the clean run and in step 3, and, with ``answer_ids = (io_ids, s_ids)``, the per-prompt
    ``logit_diff_before`` / ``logit_diff_after`` at ``query_positions``.

    Runs on the plain-tensor forward of :mod:`ioi.patching.path` (step 2 as an ablation whose
    values are the frozen outputs; only positions up to each prompt's query position, which is all
    its reads need); equal to :func:`patch_senders_to_receiver_inputs_hooked` (tests).
    """
    from ioi.ablation import Ablation
    from ioi.patching._fast_forward import UnsupportedModelError
    from ioi.patching.path import _forward_cache, _Net

    try:
        net = _Net.from_model(model)
    except (NotImplementedError, UnsupportedModelError):
        return patch_senders_to_receiver_inputs_hooked(
            model, orig_toks, new_toks, senders, receivers, receiver_input=receiver_input,
            sender_positions=sender_positions, receiver_positions=receiver_positions,
            query_positions=query_positions, answer_ids=answer_ids, pattern_heads=pattern_heads,
            memory_budget_mb=memory_budget_mb, progress=progress)
    device = model_device(model)
    orig_toks, new_toks = orig_toks.to(device), new_toks.to(device)
    N, S = orig_toks.shape
    L, H = net.n_layers, net.n_heads
    receivers = [tuple(map(int, h)) for h in receivers]
    senders = [tuple(map(int, h)) for h in senders]
    pattern_heads = receivers if pattern_heads is None else [tuple(map(int, h)) for h in pattern_heads]
    max_lr = max(l for l, _ in receivers)
    if any(l >= max_lr for l, _ in senders):
        raise ValueError(f"Senders {senders} must lie below the last receiver layer {max_lr}.")
    P = positions_mask(sender_positions, N, S, device)
    R = positions_mask(receiver_positions, N, S, device)
    query = torch.as_tensor(query_positions, device=device).long()
    receiver_layers = sorted({l for l, _ in receivers})
    pattern_layers = sorted({l for l, _ in pattern_heads})
    z_names = {f"blocks.{l}.attn.hook_z" for l in range(max_lr)}
    in_names = {f"blocks.{l}.attn.hook_{receiver_input}" for l in receiver_layers}
    pattern_names = {pattern_hook_name(l) for l in pattern_layers}
    final = f"blocks.{L - 1}.hook_resid_post"

    step = batch_size_for(model, S, memory_budget_mb)
    out: dict[str, Any] = {"before": {h: [] for h in pattern_heads}, "after": {h: [] for h in pattern_heads},
                           "logit_diff_before": [], "logit_diff_after": []}
    for start in tqdm(range(0, N, step), desc="path patching senders -> receivers", disable=not progress):
        rows = slice(start, start + step)
        o, nw, p_mask, r_mask, q_pos = orig_toks[rows], new_toks[rows], P[rows], R[rows], query[rows]
        n = o.shape[0]
        idx = torch.arange(n, device=device)
        # nothing after a prompt's query position changes what is read there (causal attention)
        clean = _forward_cache(net, o, z_names | pattern_names | {final}, last=q_pos)
        new_z = _forward_cache(net, nw, {f"blocks.{l}.attn.hook_z" for l, _ in senders}, n_layers=max_lr,
                               last=q_pos)
        # Step 2: every head below the last receiver layer frozen to x_orig, the senders from x_new
        # at their positions (an Ablation whose "means" are those frozen values); MLPs recomputed.
        keep = torch.ones(n, S, L, H, dtype=torch.bool, device=device)
        keep[:, :, :max_lr] = False
        frozen = torch.zeros(n, S, L, H, net.d_head, device=device, dtype=net.W_O.dtype)
        for layer in range(max_lr):
            frozen[:, :, layer] = clean[f"blocks.{layer}.attn.hook_z"]
        for layer, head in senders:
            frozen[:, :, layer, head] = torch.where(
                p_mask[..., None], new_z[f"blocks.{layer}.attn.hook_z"][:, :, head], frozen[:, :, layer, head])
        recorded = _forward_cache(net, o, in_names, knockout=Ablation(head_keep=keep, head_means=frozen),
                                  n_layers=max_lr + 1, last=q_pos)
        del frozen, keep
        # Step 3: x_orig with the receivers' inputs replaced at the receiver positions.
        replace: dict[int, list] = {}
        for layer, head in receivers:
            values = recorded[f"blocks.{layer}.attn.hook_{receiver_input}"][:, :, head]
            replace.setdefault(layer, []).append((head, receiver_input, r_mask, values))
        after = _forward_cache(net, o, pattern_names | {final}, last=q_pos, replace=replace)
        for (layer, head) in pattern_heads:
            name = pattern_hook_name(layer)
            out["before"][(layer, head)].append(clean[name][idx, head, q_pos].float())
            out["after"][(layer, head)].append(after[name][idx, head, q_pos].float())
        if answer_ids is not None:
            io, s = (t.to(device)[rows] for t in answer_ids)
            for key, cache in (("logit_diff_before", clean), ("logit_diff_after", after)):
                logits = net.logits(cache[final][idx, q_pos])
                out[key].append(logit_diff_from_end_logits(logits, io, s).double())
        del clean, new_z, recorded, after

    result: dict[str, Any] = {
        when: {h: torch.cat(parts).cpu() for h, parts in out[when].items()} for when in ("before", "after")
    }
    if answer_ids is not None:
        result["logit_diff_before"] = torch.cat(out["logit_diff_before"]).cpu()
        result["logit_diff_after"] = torch.cat(out["logit_diff_after"]).cpu()
    return result


@torch.no_grad()
def patch_senders_to_receiver_inputs_hooked(
    model,
    orig_toks: torch.Tensor,
    new_toks: torch.Tensor,
    senders: Sequence[Head],
    receivers: Sequence[Head],
    *,
    receiver_input: str = "q",
    sender_positions=None,
    receiver_positions=None,
    query_positions: torch.Tensor,
    answer_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    pattern_heads: Sequence[Head] | None = None,
    memory_budget_mb: int = 2048,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`patch_senders_to_receiver_inputs` with hooks on the bridge (four bridge passes per
    chunk of prompts): the reference the plain-tensor version is tested against, and the fallback
    for models the plain-tensor engine does not reproduce.

    Path patching of a *set* of senders together -> receiver inputs, returning attention.

    Step 2: ``x_orig`` run with every head's ``hook_z`` frozen to its ``x_orig`` value except the
    ``senders``, whose ``z`` comes from ``x_new`` at ``sender_positions`` (MLPs and LayerNorms
    recomputed); the receivers' ``hook_{receiver_input}`` are recorded. Step 3: a normal ``x_orig``
    run whose receivers' inputs are replaced by the recorded ones at ``receiver_positions``.

    Returns ``{"before": {head: [N, seq]}, "after": {...}}``: the attention pattern rows of
    ``pattern_heads`` (default: the receivers) from each prompt's ``query_positions`` (e.g. END)
    in the clean run and in step 3, and, with ``answer_ids = (io_ids, s_ids)``, the per-prompt
    ``logit_diff_before`` / ``logit_diff_after`` at ``query_positions``.
    """
    device = model_device(model)
    orig_toks, new_toks = orig_toks.to(device), new_toks.to(device)
    N, S = orig_toks.shape
    receivers = [tuple(map(int, h)) for h in receivers]
    senders = [tuple(map(int, h)) for h in senders]
    pattern_heads = receivers if pattern_heads is None else [tuple(map(int, h)) for h in pattern_heads]
    max_lr = max(l for l, _ in receivers)
    if any(l >= max_lr for l, _ in senders):
        raise ValueError(f"Senders {senders} must lie below the last receiver layer {max_lr}.")
    P = positions_mask(sender_positions, N, S, device)
    R = positions_mask(receiver_positions, N, S, device)
    query = torch.as_tensor(query_positions, device=device).long()
    frozen_layers = range(max_lr)
    receiver_layers = sorted({l for l, _ in receivers})
    pattern_layers = sorted({l for l, _ in pattern_heads})
    sender_layers = sorted({l for l, _ in senders})
    z_names = [f"blocks.{l}.attn.hook_z" for l in frozen_layers]
    in_name = {l: f"blocks.{l}.attn.hook_{receiver_input}" for l in receiver_layers}

    step = batch_size_for(model, S, memory_budget_mb)
    out: dict[str, Any] = {"before": {h: [] for h in pattern_heads}, "after": {h: [] for h in pattern_heads},
                           "logit_diff_before": [], "logit_diff_after": []}
    starts = range(0, N, step)
    for start in tqdm(starts, desc="path patching senders -> receivers", disable=not progress):
        rows = slice(start, start + step)
        o, nw, p_mask, r_mask, q_pos = orig_toks[rows], new_toks[rows], P[rows], R[rows], query[rows]
        n = o.shape[0]
        idx = torch.arange(n, device=device)

        def store(bucket: dict):
            def hook(act, hook):
                bucket[hook.name] = act.detach().clone()
            return hook

        # Clean x_orig run: head outputs to freeze, attention before, LD before.
        orig_acts: dict[str, torch.Tensor] = {}
        fwd = [(name, store(orig_acts)) for name in z_names]
        fwd += [(pattern_hook_name(l), store(orig_acts)) for l in pattern_layers]
        logits_before = end_logits(model, o, q_pos, fwd_hooks=fwd, memory_budget_mb=None)
        new_acts: dict[str, torch.Tensor] = {}
        model.run_with_hooks(nw, fwd_hooks=[(f"blocks.{l}.attn.hook_z", store(new_acts))
                                            for l in sender_layers])

        # Step 2: every head frozen to x_orig, the senders from x_new at their positions.
        def freeze(z, hook):
            layer = hook.layer()
            frozen = orig_acts[hook.name].clone()
            for sl, sh in senders:
                if sl == layer:
                    frozen[:, :, sh] = torch.where(p_mask[..., None], new_acts[hook.name][:, :, sh],
                                                   frozen[:, :, sh])
            return frozen

        recorded: dict[str, torch.Tensor] = {}
        fwd = [(name, freeze) for name in z_names] + [(in_name[l], store(recorded)) for l in receiver_layers]
        model.run_with_hooks(o, fwd_hooks=fwd, return_type=None)

        # Step 3: clean x_orig run, receivers' inputs replaced at the receiver positions.
        def patch_input(act, hook):
            layer = hook.layer()
            act = act.clone()
            for rl, rh in receivers:
                if rl == layer:
                    act[:, :, rh] = torch.where(r_mask[..., None], recorded[hook.name][:, :, rh], act[:, :, rh])
            return act

        after_acts: dict[str, torch.Tensor] = {}
        fwd = [(in_name[l], patch_input) for l in receiver_layers]
        fwd += [(pattern_hook_name(l), store(after_acts)) for l in pattern_layers]
        logits_after = end_logits(model, o, q_pos, fwd_hooks=fwd, memory_budget_mb=None)

        for (layer, head) in pattern_heads:
            name = pattern_hook_name(layer)
            out["before"][(layer, head)].append(orig_acts[name][idx, head, q_pos].float())
            out["after"][(layer, head)].append(after_acts[name][idx, head, q_pos].float())
        if answer_ids is not None:
            io, s = (t.to(device)[rows] for t in answer_ids)
            for key, logits in (("logit_diff_before", logits_before), ("logit_diff_after", logits_after)):
                out[key].append(logit_diff_from_end_logits(logits, io, s).double())
        del logits_before, logits_after, orig_acts, new_acts, recorded, after_acts

    # Kept on the model's device through the loop; one device -> host copy per tensor here.
    result: dict[str, Any] = {
        when: {h: torch.cat(parts).cpu() for h, parts in out[when].items()} for when in ("before", "after")
    }
    if answer_ids is not None:
        result["logit_diff_before"] = torch.cat(out["logit_diff_before"]).cpu()
        result["logit_diff_after"] = torch.cat(out["logit_diff_after"]).cpu()
    return result


def _attention_by_key(rows: torch.Tensor, word_idx: Mapping[str, torch.Tensor], end: torch.Tensor) -> dict[str, np.ndarray]:
    """Attention from END to IO, S1, S2 and all other positions up to END (sums to 1)."""
    idx = torch.arange(rows.shape[0], device=rows.device)
    out = {key: rows[idx, word_idx[key]].double().numpy() for key in ("IO", "S1", "S2")}
    upto = torch.arange(rows.shape[1], device=rows.device)[None, :] <= end[:, None]
    total = (rows.double() * upto).sum(1).numpy()
    out["other"] = total - out["IO"] - out["S1"] - out["S2"]
    return out


def fig4c(model, ctx: RunContext) -> ExperimentResult:
    """Name mover attention from END before / after PP of all S-inhibition heads -> NM queries."""
    circuit = ctx.circuit_for(model)
    dataset = ctx.ioi
    name_movers = _class_heads(circuit, "name mover")
    s_inhibition = _class_heads(circuit, "s-inhibition")
    orig, new = _pair(ctx, model)
    end = dataset.word_idx["END"]
    res = patch_senders_to_receiver_inputs(
        model, orig, new, s_inhibition, name_movers, receiver_input="q", sender_positions=end,
        receiver_positions=end, query_positions=end,
        answer_ids=(dataset.io_token_ids, dataset.s_token_ids),
        memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress,
    )
    word_idx = {k: v.cpu() for k, v in dataset.word_idx.items()}
    n = len(dataset)
    frames = []
    per_condition: dict[str, dict[str, np.ndarray]] = {}  # condition -> key -> [N] (NM mean)
    per_head_mean: dict[str, dict[str, dict[str, float | None]]] = {}
    for condition in ("before", "after"):
        stacks = {key: [] for key in KEY_POSITIONS}
        per_head_mean[condition] = {}
        for (layer, head) in name_movers:
            att = _attention_by_key(res[condition][(layer, head)], word_idx, end.cpu())
            per_head_mean[condition][head_key(layer, head)] = {k: finite(v.mean()) for k, v in att.items()}
            for key in KEY_POSITIONS:
                stacks[key].append(att[key])
                frames.append(pd.DataFrame({
                    "prompt": np.arange(n), "template": dataset.template_ids, "layer": layer,
                    "head": head, "condition": condition, "key": key, "attention": att[key],
                }))
        per_condition[condition] = {key: np.mean(stacks[key], axis=0) for key in KEY_POSITIONS}
    summary: dict[str, Any] = {}
    for condition, by_key in per_condition.items():
        summary[f"attention_{condition}"] = {k: finite(v.mean()) for k, v in by_key.items()}
        summary[f"attention_{condition}_std"] = {k: finite(v.std(ddof=1)) if n > 1 else None
                                                 for k, v in by_key.items()}
        summary[f"attention_{condition}_ci_by_key"] = {k: ci(v, ctx.seed) for k, v in by_key.items()}
        for key in ("IO", "S1", "S2"):
            summary[f"attention_{key.lower()}_{condition}"] = finite(by_key[key].mean())
    ld_before = res["logit_diff_before"].numpy()
    ld_after = res["logit_diff_after"].numpy()
    summary.update({
        "attention_per_head": per_head_mean,
        "key_positions": list(KEY_POSITIONS),
        "logit_diff_before": finite(ld_before.mean()),
        "logit_diff_after": finite(ld_after.mean()),
        "logit_diff_before_ci": ci(ld_before, ctx.seed),
        "logit_diff_after_ci": ci(ld_after, ctx.seed),
        "percent_change": finite(100 * (ld_after.mean() - ld_before.mean()) / ld_before.mean()),
        "senders": [head_key(*h) for h in s_inhibition],
        "receivers": [head_key(*h) for h in name_movers],
        "sender_position": "END",
        "receiver_position": "END",
        "std_definition": "std over prompts of the attention averaged over the name movers",
        **_shape(model, circuit),
    })
    meta = {"definition": "all S-inhibition heads' z from p_ABC at END, every other head's z frozen "
                          "to p_IOI, MLPs recomputed; name movers' hook_q recorded and patched at "
                          "END into a clean p_IOI run; attention (hook_pattern) of the name movers "
                          "from END to IO, S1, S2 and the other positions (<= END) before / after"}
    frame = pd.concat(frames, ignore_index=True)
    frame["logit_diff"] = np.where(frame["condition"] == "before", ld_before[frame["prompt"]],
                                   ld_after[frame["prompt"]])
    return ExperimentResult(frame, summary, meta)


# ------------------------------------------------------------------------------------------------
# Backup name movers (Fig. 15)
# ------------------------------------------------------------------------------------------------


def backup_name_movers(model, ctx: RunContext, knocked_out: Sequence[Head] | None = None) -> ExperimentResult:
    """Fig. 15 with an explicit set of heads knocked out at END (default: the circuit's name
    movers; ``[]``: nothing, so ``effect_after`` equals fig3b's ``effect``)."""
    circuit = ctx.circuit_for(model)
    dataset = ctx.ioi
    if knocked_out is None:
        knocked_out = _class_heads(circuit, "name mover")
    knocked_out = [tuple(map(int, h)) for h in knocked_out]
    orig, new = _pair(ctx, model)
    end = dataset.word_idx["END"]
    ld, clean = _clean(model, ctx)
    ablation = None
    if knocked_out:
        step = batch_size_for(model, orig.shape[1], ctx.memory_budget_mb)
        means = compute_template_means(model, new, dataset.groups, component="z", batch_size=step)
        ablation = head_knockout(means, {h: end for h in knocked_out}, seq=orig.shape[1])
    ld_ko = knockout_logit_diffs(model, dataset, ctx.memory_budget_mb, [ablation])[0] if ablation is not None else ld
    if ld_ko.mean() == 0:
        raise ValueError("The knocked-out logit difference is 0: a % change relative to it is undefined.")
    frames, summary = [], {}
    for variant, base, knockout in (("before_knockout", ld, None), ("after_knockout", ld_ko, ablation)):
        metric = _ld_metric(dataset)
        values = path_patch_to_logits(model, orig, new, metric, sender_positions=end, knockout=knockout,
                                      progress=ctx.progress, memory_budget_mb=ctx.memory_budget_mb)
        mean, low, high = _head_stats(_percent_change(values, base), ctx.seed)
        frames.append(_head_frame(mean, low, high, variant, circuit, len(ld)))
        prefix = "effect_before" if variant == "before_knockout" else "effect_after"
        summary.update(_effect_summary(mean, low, high, prefix))
        if variant == "after_knockout":
            summary.update(backup_name_mover_selection(mean, circuit))
    low, high = bootstrap_ratio_ci(ld_ko, ld, n_resamples=N_BOOTSTRAP, seed=ctx.seed)
    summary.update({
        **clean,
        "knockout_logit_diff": finite(ld_ko.mean()),
        "knockout_logit_diff_ci": ci(ld_ko, ctx.seed),
        "knockout_logit_diff_ratio": finite(ld_ko.mean() / ld.mean()),
        "knockout_logit_diff_ratio_ci": [finite(low), finite(high)],
        "knocked_out": [head_key(*h) for h in knocked_out],
        "knockout_position": "END",
        "knockout_means": "template-wise p_ABC means of hook_z",

        "effect_after_baseline": "knocked-out LD",
        "unit": "% change in logit difference",
        **_shape(model, circuit),
    })
    meta = {"definition": "knocked-out heads' z at END replaced by template-wise p_ABC means in every "
                          "run; path patching head (END) -> logits before (relative to the clean LD) "
                          "and after the knockout (relative to the knocked-out LD); backup candidates "
                          "(paper App. F): heads in no class of the circuit other than the backup "
                          f"name movers with |effect after| > {BACKUP_THRESHOLD_PERCENT}%, by "
                          f"decreasing |effect|; backup_selected: the first {N_BACKUP_SELECTED}"}
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary, meta)


def backup_name_mover_selection(effect_after: np.ndarray, circuit: Circuit) -> dict[str, Any]:
    """The paper's backup name mover rule (App. F) on the % change in LD after the knockout
    (``effect_after [L, H]``): heads in no class of ``circuit`` other than the backup name movers,
    whose effect size exceeds ``BACKUP_THRESHOLD_PERCENT`` (|effect| > 2), ordered by decreasing
    |effect| (either sign: the paper's 9.7 writes negatively)."""
    excluded = {head_key(*h) for cls, heads in circuit.classes.items() if cls != BACKUP_CLASS
                for h in heads}
    L, H = effect_after.shape
    cells = [(abs(float(effect_after[l, h])), head_key(l, h)) for l in range(L) for h in range(H)
             if np.isfinite(effect_after[l, h]) and head_key(l, h) not in excluded
             and abs(float(effect_after[l, h])) > BACKUP_THRESHOLD_PERCENT]
    cells.sort(key=lambda c: -c[0])
    candidates = [name for _, name in cells]
    return {
        "backup_candidates": candidates,
        "backup_selected": candidates[:N_BACKUP_SELECTED],
        "backup_rule": (f"heads in no other class of the circuit with |effect after| > "
                        f"{BACKUP_THRESHOLD_PERCENT}% (% change in LD), by decreasing |effect|; "
                        f"backup_selected = the first {N_BACKUP_SELECTED} (paper App. F)"),
        "backup_threshold_percent": BACKUP_THRESHOLD_PERCENT,
        "backup_excluded_heads": sorted(excluded),
    }


def fig15(model, ctx: RunContext) -> ExperimentResult:
    """Knock out the circuit's name movers at END; PP heads -> logits before / after."""
    return backup_name_movers(model, ctx)


# ------------------------------------------------------------------------------------------------
# MLPs (Fig. 19)
# ------------------------------------------------------------------------------------------------


def fig19(model, ctx: RunContext) -> ExperimentResult:
    """LD after mean-ablating each MLP (and all but MLP0); PP each MLP -> logits at END."""
    circuit = ctx.circuit_for(model)
    dataset = ctx.ioi
    L = int(model.cfg.n_layers)
    if getattr(model.cfg, "attn_only", False):
        raise ValueError("fig19 needs a model with MLPs.")
    orig, new = _pair(ctx, model)
    end = dataset.word_idx["END"]
    S = orig.shape[1]
    ld, clean = _clean(model, ctx)
    step = batch_size_for(model, S, ctx.memory_budget_mb)
    mlp_means = compute_template_means(model, new, dataset.groups, component="mlp_out", batch_size=step)
    ablations = [mlp_knockout(mlp_means, [layer], seq=S) for layer in range(L)]
    ablations.append(mlp_knockout(mlp_means, range(1, L), seq=S))
    values = knockout_logit_diffs(model, dataset, ctx.memory_budget_mb, ablations)  # one batched pass
    knocked, all_but_0 = values[:L], values[L]  # [L, N], [N]
    metric = _ld_metric(dataset)
    pp = _percent_change(path_patch_to_logits(model, orig, new, metric, sender_positions=end, senders="mlps",
                                              progress=ctx.progress, memory_budget_mb=ctx.memory_budget_mb), ld)
    pct = 100.0 * (knocked - ld) / ld.mean()  # paired; mean = % change of the mean
    rows = []
    for layer in range(L):
        for variant, values, unit in (("knockout", knocked[layer], "logit difference"),
                                      ("knockout_percent_change", pct[layer], "% change in logit difference"),
                                      ("path_patching", pp[layer], "% change in logit difference")):
            low, high = ci(values, ctx.seed)
            rows.append({"layer": layer, "variant": variant, "value": values.mean(), "ci_low": low,
                         "ci_high": high, "unit": unit})
    for variant, values in (("knockout_all_but_mlp0", all_but_0), ("clean", ld)):
        low, high = ci(values, ctx.seed)
        rows.append({"layer": np.nan, "variant": variant, "value": values.mean(), "ci_low": low,
                     "ci_high": high, "unit": "logit difference"})
    frame = pd.DataFrame(rows)
    frame["n_prompts"] = len(ld)
    summary = {
        **clean,
        "mlp_knockout_logit_diff": [finite(v) for v in knocked.mean(1)],
        "mlp_knockout_logit_diff_ci": [ci(v, ctx.seed) for v in knocked],
        "mlp_knockout_percent_change": [finite(v) for v in pct.mean(1)],
        "mlp_path_patching_effect": [finite(v) for v in pp.mean(1)],
        "mlp_path_patching_effect_ci": [ci(v, ctx.seed) for v in pp],
        "mlp0_knockout_logit_diff": finite(knocked[0].mean()),
        "mlp0_knockout_logit_diff_ci": ci(knocked[0], ctx.seed),
        "all_but_mlp0_knockout_logit_diff": finite(all_but_0.mean()),
        "all_but_mlp0_knockout_logit_diff_ci": ci(all_but_0, ctx.seed),
        "knockout_means": "template-wise p_ABC means of hook_mlp_out, every position",
        "sender_position": "END",
        "unit_path_patching": "% change in logit difference",
        **_shape(model, circuit),
    }
    meta = {"definition": "knockout: hook_mlp_out of the layer(s) replaced at every position by "
                          "template-wise p_ABC means; path patching MLP (END) -> logits with every "
                          "head frozen (ioi.patching.path.path_patch_to_logits, senders='mlps')"}
    return ExperimentResult(frame, summary, meta)

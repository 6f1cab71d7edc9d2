"""Where the position signal comes from (paper §3.3) and pointer arithmetic (paper App. A).

Both are activation patching: a set of heads' outputs (``hook_z``) is taken from a run on another
dataset and written into the run on p_IOI at one position per prompt; everything downstream is
recomputed and the logit difference is read w.r.t. p_IOI's own IO and S at END.

``position_signal`` (§3.3, "Locating the position signal"). For each signal-specific dataset of
App. A (:data:`ioi.experiments.signals.SIGNAL_CELLS`, position-aligned with p_IOI), two patches:

* the S-inhibition heads' z at END (as Fig. 9; the reference drop), and
* the induction and duplicate-token heads' z at S2 (their relevant position, where they write the
  position and token of S1 that the S-inhibition heads read).

The ratio of drops ``(LD_clean - LD_early) / (LD_clean - LD_sinh)`` (ratio of mean drops; paired
bootstrap CI; undefined where the S-inhibition patch moves the mean LD by less than 5% of the clean
LD) says how much of the S-inhibition heads' signal the early heads carry. The paper:
from "sentences with altered position signals" the drop is "almost the same size as patching the
S-Inhibition Heads (at least 88%)"; from "a dataset with a different S1 and S2 token but at the same
position" it is "less than 8%". The paper names neither dataset; we read the first as the three
inverted-position datasets (IO<->S1 swap, alone or with the random / inverted token:
:data:`ALTERED_POSITION_CELLS`; ``altered_position_ratio_min`` is the smallest of the three) and the
second as the random-name dataset with positions kept (:data:`SAME_POSITION_CELL`, every name
replaced by a fresh one, consistently). All five non-trivial cells are reported.

``pointer_arithmetic`` (App. A). A copy of p_IOI whose sentence openings are replaced by the paper
code's longer prefixes (``flip_prefixes``: one of :data:`PREFIXES`, drawn per prompt with a seeded
generator, then the sentence from its first name on; a template starting "The [PLACE] ..." becomes
"After the lunch, the [PLACE] ..."). Names, S1-S2 distance and everything after the first name are
unchanged; the absolute positions shift. The S-inhibition heads' z at the source's own END is
patched into p_IOI's END. The paper: "the logit difference doesn't change (3.56 before patching vs
3.57 after)". (The paper code's "The " branch drops the space: "After the lunch, thestore"; it only
touches template 14, which the paper runs never sample; we keep the space.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ioi.ablation import Ablation, evaluate_ablations
from ioi.breakdown import breakdown_mean, breakdown_ratio, group_labels
from ioi.circuits import DUPLICATE_TOKEN, INDUCTION, S_INHIBITION
from ioi.experiments.attribution import circuit_summary, finite, head_key
from ioi.experiments.circuit_eval import mean_and_ci
from ioi.experiments.core import ExperimentResult, RunContext
from ioi.experiments.signals import SIGNAL_CELLS, _z_cache, signal_datasets
from ioi.metrics import LogitDiff
from ioi.stats import bootstrap_ratio_ci

Head = tuple[int, int]

ALTERED_POSITION_CELLS = ("orig_tok_inv_pos", "rand_tok_inv_pos", "inv_tok_inv_pos")
SAME_POSITION_CELL = "rand_tok_orig_pos"
PATCHED_CELLS = tuple(c for c in SIGNAL_CELLS if c != "orig_tok_orig_pos")
N_BOOTSTRAP = 1000
# A ratio of drops is reported only where the reference (S-inhibition) patch moves the mean LD by at
# least this fraction of the clean LD; below it the ratio is noise over noise (None, and the cell is
# listed in ``ratio_undefined_cells``).
MIN_REFERENCE_DROP = 0.05

# The paper code's PREFIXES (easy_transformer/ioi_dataset.py), leading spaces included: runs of
# spaces are extra tokens, so the absolute positions move while the sentence after them does not.
PREFIXES = (
    "             Afterwards,",
    "            Two friends met at a bar. Then,",
    "  After a long day,",
    "  After a long day,",
    "    Then,",
    "         Then,",
)
THE_PREFIX = "After the lunch, the "

PAPER_POSITION_SIGNAL = {"altered_position_ratio_min": ">= 0.88", "same_position_ratio": "< 0.08",
                         "source": "Paper §3.3 'Locating the position signal' (ioi_paper.md §4.2)"}
PAPER_POINTER = {"logit_diff_before": 3.56, "logit_diff_after": 3.57,
                 "source": "Paper App. A, pointer arithmetic (ioi_paper.md §4.2)"}


# ------------------------------------------------------------------------------------------------
# Patching one position per prompt from a source run
# ------------------------------------------------------------------------------------------------


def _heads_by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return out


def gather_at(z_by_layer: dict[int, torch.Tensor], positions: torch.Tensor) -> dict[int, torch.Tensor]:
    """``z[prompt, positions[prompt]]`` of each layer: ``[N, seq, heads, d_head] -> [N, heads, d_head]``."""
    out = {}
    for layer, z in z_by_layer.items():
        pos = positions.to(z.device)
        out[layer] = z[torch.arange(z.shape[0], device=z.device), pos]
    return out


def patch_heads_at(heads: Sequence[Head], source: dict[int, torch.Tensor], target_positions: torch.Tensor):
    """``rows -> hooks`` writing ``source[layer][prompt, head]`` (``[N, heads, d_head]``) into
    ``hook_z[prompt, target_positions[prompt], head]`` of each listed head."""
    by_layer = _heads_by_layer(heads)

    def hooks_for_rows(rows: slice) -> list:
        hooks = []
        for layer, layer_heads in by_layer.items():
            src = source[layer][rows]
            pos = target_positions[rows].to(src.device)
            idx = torch.arange(pos.shape[0], device=src.device)
            head_idx = torch.tensor(layer_heads, device=src.device)

            def hook(z, hook, src=src, pos=pos, idx=idx, head_idx=head_idx):
                z = z.clone()
                z[idx[:, None], pos[:, None], head_idx[None, :]] = src[:, head_idx].to(z.dtype)
                return z

            hooks.append((f"blocks.{layer}.attn.hook_z", hook))
        return hooks

    return hooks_for_rows


def one_position_patches(
    z_by_layer: dict[int, torch.Tensor],
    patches: Sequence[tuple[Sequence[Head], torch.Tensor, torch.Tensor]],
    n_layers: int,
    n_heads: int,
    seq: int,
) -> list[Ablation]:
    """The patches of :func:`patch_heads_at` as :class:`ioi.ablation.Ablation` s sharing one
    values tensor, for the batched plain-tensor engine (:func:`ioi.ablation.evaluate_ablations`).

    ``patches``: ``(heads, source_positions [N], target_positions [N])``: ``hook_z[n,
    target[n], head]`` of p_IOI is replaced by the source's ``z_by_layer[layer][n, source[n], head]``
    (``[N, src_seq, heads, d_head]``); every other ``z`` is kept. Patches of one list must not
    write the same (prompt, position, head) from different source positions (they share values).
    """
    any_z = next(iter(z_by_layer.values()))
    N, device, dtype = any_z.shape[0], any_z.device, any_z.dtype
    values = torch.zeros(N, seq, n_layers, n_heads, any_z.shape[-1], device=device, dtype=dtype)
    written = torch.zeros(N, seq, n_layers, n_heads, dtype=torch.bool, device=device)
    rows = torch.arange(N, device=device)
    out = []
    for heads, source_pos, target_pos in patches:
        keep = torch.ones(N, seq, n_layers, n_heads, dtype=torch.bool, device=device)
        src, tgt = source_pos.to(device).long(), target_pos.to(device).long()
        for layer, head in heads:
            value = z_by_layer[layer][rows, src, head]  # [N, d_head]
            if written[rows, tgt, layer, head].any() and not torch.equal(values[rows, tgt, layer, head], value):
                raise ValueError("Two patches write different values into the same head and position.")
            values[rows, tgt, layer, head] = value
            written[rows, tgt, layer, head] = True
            keep[rows, tgt, layer, head] = False
        out.append(Ablation(head_keep=keep, head_means=values))
    return out


def patched_end_logit_diffs(model, dataset, ablations: Sequence[Ablation | None], memory_budget_mb: int) -> list[np.ndarray]:
    """Per-prompt LD at END (float64 ``[N]``, p_IOI's IO and S) under each patch (``None``: clean):
    many patches per batched pass of the plain-tensor engine (equal to the hooked
    :class:`ioi.experiments.circuit_eval.EndLogitDiff` runs of :func:`patch_heads_at`; tested)."""
    metric = LogitDiff.from_dataset(dataset, per_prompt=True)
    values = evaluate_ablations(model, dataset.toks, metric, list(ablations), memory_budget_mb=memory_budget_mb)
    return [v.detach().double().cpu().numpy() for v in values]


def _class(circuit, *classes: str) -> list[Head]:
    heads = [tuple(map(int, h)) for cls in classes for h in circuit.classes.get(cls, ())]
    if not heads:
        raise ValueError(f"Circuit {circuit.name!r} has no {' / '.join(classes)} heads to patch.")
    return heads


# ------------------------------------------------------------------------------------------------
# §3.3: locating the position signal
# ------------------------------------------------------------------------------------------------


def position_signal(model, ctx: RunContext) -> ExperimentResult:
    """Patch the induction + duplicate-token heads (S2) and, as the reference, the S-inhibition heads
    (END) from each signal-specific dataset into p_IOI; the ratio of the two LD drops."""
    circuit = ctx.circuit_for(model)
    sinh = _class(circuit, S_INHIBITION)
    early = _class(circuit, INDUCTION, DUPLICATE_TOKEN)
    ioi = ctx.ioi
    clean = patched_end_logit_diffs(model, ioi, [None], ctx.memory_budget_mb)[0]
    end, s2 = ioi.word_idx["END"], ioi.word_idx["S2"]
    L, H, S = int(model.cfg.n_layers), int(model.cfg.n_heads), ioi.toks.shape[1]
    layers = sorted({l for l, _ in sinh + early})
    labels = group_labels(ioi)
    frames, summary_cells = [], {}
    breakdown: dict[str, Any] = {}
    datasets = signal_datasets(ioi)
    for cell in PATCHED_CELLS:
        z = _z_cache(model, datasets[cell], layers, ctx.memory_budget_mb)
        # (a) the S-inhibition heads at END, (b) the early heads at S2: one batched pass
        ablations = one_position_patches(z, [(sinh, end, end), (early, s2, s2)], L, H, S)
        ld_sinh, ld_early = patched_end_logit_diffs(model, ioi, ablations, ctx.memory_budget_mb)
        del z, ablations
        drop_sinh, drop_early = clean - ld_sinh, clean - ld_early
        defined = abs(drop_sinh.mean()) >= MIN_REFERENCE_DROP * abs(clean.mean())
        ratio = drop_early.mean() / drop_sinh.mean() if defined else float("nan")
        ratio_ci = (bootstrap_ratio_ci(drop_early, drop_sinh, n_resamples=N_BOOTSTRAP, seed=ctx.seed)
                    if defined else (float("nan"), float("nan")))
        _, s_tok, s_pos = SIGNAL_CELLS[cell]
        summary_cells[cell] = {
            "token_signal": s_tok, "position_signal": s_pos,
            **mean_and_ci("logit_diff_sinh_patched", ld_sinh, ctx.seed),
            **mean_and_ci("logit_diff_early_patched", ld_early, ctx.seed),
            **mean_and_ci("drop_sinh", drop_sinh, ctx.seed),
            **mean_and_ci("drop_early", drop_early, ctx.seed),
            "ratio": finite(ratio),
            "ratio_ci": [finite(x) for x in ratio_ci],
            "ratio_defined": bool(defined),
        }
        if defined:
            breakdown[f"ratio_{cell}"] = breakdown_ratio(
                drop_early, drop_sinh, labels, seed=ctx.seed,
                definition="(LD_clean - LD_early patched) / (LD_clean - LD_S-inhibition patched), ratio "
                           "of mean drops within the group")
        frames.append(pd.DataFrame({
            "prompt": np.arange(len(ioi)), "template": ioi.template_ids, "order": ioi.template_forms,
            "cell": cell, "token_signal": s_tok, "position_signal": s_pos,
            "clean_logit_diff": clean, "logit_diff_sinh_patched": ld_sinh,
            "logit_diff_early_patched": ld_early,
        }))
    altered = {c: summary_cells[c]["ratio"] for c in ALTERED_POSITION_CELLS
               if summary_cells[c]["ratio"] is not None}
    summary: dict[str, Any] = {
        "cells": summary_cells,
        "ratio": {c: summary_cells[c]["ratio"] for c in PATCHED_CELLS},
        "drop_sinh": {c: summary_cells[c]["drop_sinh"] for c in PATCHED_CELLS},
        "drop_early": {c: summary_cells[c]["drop_early"] for c in PATCHED_CELLS},
        "altered_position_cells": list(ALTERED_POSITION_CELLS),
        "altered_position_ratio_min": finite(min(altered.values())) if altered else None,
        "altered_position_ratio_min_cell": min(altered, key=altered.get) if altered else None,
        "ratio_undefined_cells": [c for c in PATCHED_CELLS if not summary_cells[c]["ratio_defined"]],
        "min_reference_drop": MIN_REFERENCE_DROP,
        "same_position_cell": SAME_POSITION_CELL,
        "same_position_ratio": summary_cells[SAME_POSITION_CELL]["ratio"],
        "same_position_ratio_ci": summary_cells[SAME_POSITION_CELL]["ratio_ci"],
        **mean_and_ci("clean_logit_diff", clean, ctx.seed),
        "early_heads": [head_key(*h) for h in early],
        "sinh_heads": [head_key(*h) for h in sinh],
        "early_position": "S2",
        "sinh_position": "END",
        "breakdown": breakdown,
        "circuit": circuit_summary(circuit),
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
    }
    if circuit.name == "paper":
        summary["paper_reference"] = dict(PAPER_POSITION_SIGNAL)
    meta = {
        "definition": "activation patching from each signal-specific dataset (ioi.experiments.signals."
                      "SIGNAL_CELLS) into p_IOI: (a) the S-inhibition heads' hook_z at END, (b) the "
                      "induction and duplicate-token heads' hook_z at S2; everything downstream "
                      "recomputed; ratio = mean drop (b) / mean drop (a)",
        "altered_position_cells": list(ALTERED_POSITION_CELLS),
        "same_position_cell": SAME_POSITION_CELL,
        "dataset_hashes": {c: datasets[c].content_hash() for c in PATCHED_CELLS},
        "ci": "ratio_ci: paired percentile bootstrap over prompts (drops resampled jointly)",
    }
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary, meta)


# ------------------------------------------------------------------------------------------------
# App. A: pointer arithmetic (longer prefixes)
# ------------------------------------------------------------------------------------------------


def _first_name_index(template: str) -> int:
    found = [i for i in (template.find("[A]"), template.find("[B]")) if i >= 0]
    if not found:
        raise ValueError(f"Template {template!r} has no name placeholder: cannot replace its prefix.")
    return min(found)


def prefixed_template(template: str, prefix: str) -> str:
    """The paper code's ``flip_prefixes`` on a template: ``prefix + " " + template[first name:]``,
    or "After the lunch, the ..." for a template starting with "The "."""
    if template.startswith("The "):
        return THE_PREFIX + template[len("The "):]
    return prefix + " " + template[_first_name_index(template):]


def prefix_flipped(dataset, *, seed: int = 0):
    """A copy of ``dataset`` (same names, places, objects, labels) whose sentence openings are the
    paper code's longer prefixes; positions are recomputed (they shift)."""
    from ioi.data import IOIDataset

    rng = np.random.default_rng([int(seed), 3])
    choices = rng.integers(len(PREFIXES), size=len(dataset))
    prompts = [replace(p, template=prefixed_template(p.template, PREFIXES[int(k)]))
               for p, k in zip(dataset.prompts, choices)]
    st = dataset.settings
    return IOIDataset(prompts=prompts, tokenizer=dataset.tokenizer, seed=dataset.seed,
                      prepend_bos=st.prepend_bos, names=st.names, places=st.places, objects=st.objects,
                      distinct_names=st.distinct_names)


def pointer_arithmetic(model, ctx: RunContext) -> ExperimentResult:
    """Patch the S-inhibition heads' z at END from the longer-prefix copy of p_IOI (at its own END)
    into p_IOI's END; the LD before and after."""
    circuit = ctx.circuit_for(model)
    sinh = _class(circuit, S_INHIBITION)
    ioi = ctx.ioi
    source = prefix_flipped(ioi, seed=ctx.seed)
    shift = (source.word_idx["S1"] - ioi.word_idx["S1"]).cpu().numpy()
    distance_kept = bool(torch.equal((source.word_idx["S2"] - source.word_idx["S1"]).cpu(),
                                     (ioi.word_idx["S2"] - ioi.word_idx["S1"]).cpu()))
    z = _z_cache(model, source, sorted({l for l, _ in sinh}), ctx.memory_budget_mb)
    ablation = one_position_patches(z, [(sinh, source.word_idx["END"], ioi.word_idx["END"])],
                                    int(model.cfg.n_layers), int(model.cfg.n_heads), ioi.toks.shape[1])
    before, after = patched_end_logit_diffs(model, ioi, [None, *ablation], ctx.memory_budget_mb)
    del z, ablation
    source_ld = patched_end_logit_diffs(model, source, [None], ctx.memory_budget_mb)[0]
    labels = group_labels(ioi)
    diff = after - before
    summary: dict[str, Any] = {
        **mean_and_ci("logit_diff_before", before, ctx.seed),
        **mean_and_ci("logit_diff_after", after, ctx.seed),
        **mean_and_ci("difference", diff, ctx.seed),
        "abs_difference": finite(abs(diff.mean())),
        **mean_and_ci("source_logit_diff", source_ld, ctx.seed),
        "position_shift_mean": finite(shift.mean()),
        "position_shift_min": int(shift.min()),
        "position_shift_max": int(shift.max()),
        "s1_s2_distance_kept": distance_kept,
        "patched_heads": [head_key(*h) for h in sinh],
        "prefixes": list(PREFIXES),
        "breakdown": {
            "logit_diff_after": breakdown_mean(after, labels, seed=ctx.seed,
                                               definition="LD after patching, mean over the group"),
            "difference": breakdown_mean(diff, labels, seed=ctx.seed,
                                         definition="LD after - LD before, mean over the group"),
        },
        "circuit": circuit_summary(circuit),
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
    }
    if circuit.name == "paper":
        summary["paper_reference"] = dict(PAPER_POINTER)
    frame = pd.DataFrame({
        "prompt": np.arange(len(ioi)), "template": ioi.template_ids, "order": ioi.template_forms,
        "source_sentence": source.sentences, "position_shift": shift,
        "logit_diff_before": before, "logit_diff_after": after, "source_logit_diff": source_ld,
    })
    meta = {
        "definition": "activation patching of the S-inhibition heads' hook_z from the run on the "
                      "longer-prefix copy of p_IOI (taken at its own END) into p_IOI's END; "
                      "everything downstream recomputed; LD w.r.t. p_IOI's IO and S",
        "prefix_choice": "seeded numpy Generator ([seed, 3]) over the paper code's 6 PREFIXES",
        "the_template": "'The [PLACE] ...' -> 'After the lunch, the [PLACE] ...' (the paper code "
                        "omits the space; only template 14 starts with 'The')",
        "source_hash": source.content_hash(),
    }
    return ExperimentResult(frame, summary, meta)

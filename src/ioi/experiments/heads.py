"""What individual heads do (paper §3.1-3.2, Figs. 3c, 16, 17, 18): attention between the IOI
positions, attention vs. write along the names' unembeddings, copy scores, and head scores on
repeated random tokens.

* ``attention_summary``: for every head, the mean attention probability END -> IO, END -> S1,
  END -> S2, S2 -> S1 and S2 -> S1+1, and per circuit class the mean over its heads with a 95%
  bootstrap CI over prompts. The paper: name movers END -> IO 0.59 (§3.1), S-inhibition heads
  END -> S2 0.51 (§3.2).
* ``fig3c`` / ``fig16``: per prompt, a head's attention END -> IO (END -> S1 + END -> S2) and the raw
  dot product of its END output with ``W_U[IO]`` (``W_U[S]``), no final LN
  (:func:`ioi.analysis.attention_projection_frame`); Pearson correlation over the pooled IO and S
  points ("rho > 0.81, N = 500" for a name mover).
* ``copy_scores``: the paper code's copy score and negative copy score of every head
  (:func:`ioi.analysis.copy_scores`, ``variant="paper"``; needs ``fold_value_biases=False``).
* ``repeated_tokens``: previous-token, duplicate-token, induction and next-token-contribution
  scores of every head on sequences of 100 random tokens repeated once, no BOS (App. H/I).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ioi.analysis import (
    attention_projection_frame,
    check_value_biases,
    copy_score_definition,
    copy_score_hits,
    generate_repeated_tokens,
    head_scores,
    paper_copy_inputs,
    scatter_correlations,
    score_grid,
)
from ioi.analysis.attention import attention_to_positions, pattern_hook_name
from ioi.analysis.repeated_tokens import SCORE_NAMES, repeated_token_hook_names
from ioi.circuits import (
    BACKUP_NAME_MOVER,
    NAME_MOVER,
    NEGATIVE_NAME_MOVER,
    S_INHIBITION,
    Circuit,
)
from ioi.experiments.attribution import (
    _shape_summary,
    ci,
    class_of_heads,
    dataset_batches,
    finite,
    head_key,
    per_head_dict,
    prompts_per_batch,
)
from ioi.experiments.core import ExperimentResult, RunContext
from ioi.forward import cache_activations

# ------------------------------------------------------------------------------------------------
# Attention between the IOI positions
# ------------------------------------------------------------------------------------------------

# (summary key / frame column, query position, key position(s))
ATTENTION_QUANTITIES: tuple[tuple[str, str, str], ...] = (
    ("end_to_io", "END", "IO"),
    ("end_to_s1", "END", "S1"),
    ("end_to_s2", "END", "S2"),
    ("s2_to_s1", "S2", "S1"),
    ("s2_to_s1_plus_1", "S2", "S1+1"),
)
PAPER_NAME_MOVER_ATTENTION_IO = 0.59
PAPER_S_INHIBITION_ATTENTION_S2 = 0.51


def attention_arrays(model, dataset, memory_budget_mb: int) -> dict[str, np.ndarray]:
    """``quantity -> [N, n_layers, n_heads]`` attention probabilities (see ATTENTION_QUANTITIES)."""
    n_layers = model.cfg.n_layers
    names = [pattern_hook_name(layer) for layer in range(n_layers)]
    step = prompts_per_batch(model, dataset.max_len, memory_budget_mb, patterns=True)
    out: dict[str, list[np.ndarray]] = {q: [] for q, _, _ in ATTENTION_QUANTITIES}
    for _, sub in dataset_batches(dataset, step):
        cache = cache_activations(model, sub.toks.to(model.W_U.device), names)  # hook-free: plain
        idx = {k: sub.word_idx[k] for k in ("IO", "S1", "S1+1", "S2", "END")}
        per_layer: dict[str, list[torch.Tensor]] = {q: [] for q in out}
        for layer in range(n_layers):
            for query in ("END", "S2"):
                wanted = [(q, key) for q, qpos, key in ATTENTION_QUANTITIES if qpos == query]
                values = attention_to_positions(
                    cache, None, layer, None, idx[query], {q: idx[key] for q, key in wanted}
                )
                for q, _ in wanted:
                    per_layer[q].append(values[q])  # [batch, head], on the model's device
        del cache
        # One device -> host copy per batch (not one per layer and quantity).
        stacked = torch.stack([torch.stack(per_layer[q], 1) for q in out]).double().cpu()
        for q, values in zip(out, stacked):
            out[q].append(values.numpy())  # [batch, layer, head]
    return {q: np.concatenate(chunks) for q, chunks in out.items()}


def _class_heads(circuit: Circuit, cls: str) -> list[tuple[int, int]]:
    return [tuple(h) for h in circuit.classes.get(cls, ())]


def attention_summary(model, ctx: RunContext) -> ExperimentResult:
    """Attention END -> {IO, S1, S2} and S2 -> {S1, S1+1} of every head, and per circuit class."""
    circuit = ctx.circuit_for(model)
    dataset = ctx.ioi
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    arrays = attention_arrays(model, dataset, ctx.memory_budget_mb)
    n = len(dataset)
    classes = class_of_heads(circuit, n_layers, n_heads)
    frame = pd.DataFrame(
        {
            "prompt": np.repeat(np.arange(n), n_layers * n_heads),
            "template": np.repeat(np.array(dataset.template_ids), n_layers * n_heads),
            "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), n),
            "head": np.tile(np.tile(np.arange(n_heads), n_layers), n),
            **{q: arrays[q].reshape(n, -1).flatten() for q in arrays},
        }
    )
    frame.insert(4, "class", [classes[head_key(l, h)] for l, h in zip(frame["layer"], frame["head"])])

    class_mean: dict[str, dict[str, float | None]] = {}
    class_ci: dict[str, dict[str, list]] = {}
    per_prompt_class: dict[str, dict[str, np.ndarray]] = {}
    for cls in circuit.class_names():
        heads = _class_heads(circuit, cls)
        if not heads:
            continue
        layers, idx = zip(*heads)
        per_prompt_class[cls] = {q: arrays[q][:, list(layers), list(idx)].mean(1) for q in arrays}
        class_mean[cls] = {q: finite(v.mean()) for q, v in per_prompt_class[cls].items()}
        class_ci[cls] = {q: ci(v, ctx.seed) for q, v in per_prompt_class[cls].items()}

    def headline(cls: str, quantity: str):
        if cls not in per_prompt_class:
            return None, [None, None]
        values = per_prompt_class[cls][quantity]
        return finite(values.mean()), ci(values, ctx.seed)

    nm_io, nm_io_ci = headline(NAME_MOVER, "end_to_io")
    sinh_s2, sinh_s2_ci = headline(S_INHIBITION, "end_to_s2")
    summary = {
        **{q: per_head_dict(arrays[q].mean(0)) for q in arrays},
        "quantities": [q for q, _, _ in ATTENTION_QUANTITIES],
        "name_mover_attention_io_mean": nm_io,
        "name_mover_attention_io_mean_ci": nm_io_ci,
        "s_inhibition_attention_s2_mean": sinh_s2,
        "s_inhibition_attention_s2_mean_ci": sinh_s2_ci,
        "all_heads_attention_io_mean": finite(arrays["end_to_io"].mean()),
        "class_attention": class_mean,
        "class_attention_ci": class_ci,
        "paper": {"name_mover_attention_io_mean": PAPER_NAME_MOVER_ATTENTION_IO,
                  "s_inhibition_attention_s2_mean": PAPER_S_INHIBITION_ATTENTION_S2},
        **_shape_summary(model, circuit),
    }
    meta = {
        "definition": "post-softmax attention probability (attn.hook_pattern) from each prompt's "
                      "query position to its key position; class values: mean over the class's "
                      "heads per prompt, then over prompts; CI: 95% percentile bootstrap over "
                      "prompts (1000 resamples, seed = run seed)",
        "bootstrap_resamples": 1000,
    }
    return ExperimentResult(frame, summary, meta)


# ------------------------------------------------------------------------------------------------
# Attention vs. projection on the names' unembeddings (Fig. 3c, Fig. 16)
# ------------------------------------------------------------------------------------------------

PAPER_FIG3C_RHO = 0.81


def _scatter(model, ctx: RunContext, heads: list[tuple[int, int]]) -> pd.DataFrame:
    dataset = ctx.ioi
    layers = sorted({layer for layer, _ in heads})
    names = [f"blocks.{l}.attn.hook_{k}" for l in layers for k in ("pattern", "z")]
    step = prompts_per_batch(model, dataset.max_len, ctx.memory_budget_mb, patterns=True)
    frames = []
    for start, sub in dataset_batches(dataset, step):
        # the patterns and z of the heads' layers only: the forward stops after the last of them
        cache = cache_activations(model, sub.toks.to(model.W_U.device), names)
        part = attention_projection_frame(
            model, cache, heads, sub.word_idx["END"], sub.word_idx["IO"], sub.word_idx["S1"],
            sub.word_idx["S2"], sub.io_token_ids, sub.s_token_ids,
        )
        del cache
        part["prompt"] += start
        part.insert(3, "template", np.array(sub.template_ids)[part["prompt"].to_numpy() - start])
        frames.append(part)
    return pd.concat(frames, ignore_index=True)


def _scatter_result(model, ctx: RunContext, heads, head_class: str, note: str) -> ExperimentResult:
    circuit = ctx.circuit
    columns = ["layer", "head", "prompt", "template", "name_kind", "attention", "projection"]
    frame = _scatter(model, ctx, heads) if heads else pd.DataFrame(columns=columns)
    if heads:
        frame.insert(2, "class", [circuit.class_of((l, h)) or "other"
                                  for l, h in zip(frame["layer"], frame["head"])])
    corr = scatter_correlations(frame) if heads else pd.DataFrame(
        columns=["layer", "head", "name_kind", "pearson_r", "n"])

    def by_kind(kind: str) -> dict[str, float | None]:
        rows = corr[corr.name_kind == kind]
        return {head_key(r.layer, r.head): finite(r.pearson_r) for r in rows.itertuples()}

    pooled = by_kind("pooled")
    finite_pooled = [v for v in pooled.values() if v is not None]
    summary = {
        "heads": [head_key(*h) for h in heads],
        "head_class": head_class,
        "note": note,
        "correlation": pooled,
        "correlation_io": by_kind("IO"),
        "correlation_s": by_kind("S"),
        "correlation_min": finite(min(finite_pooled)) if finite_pooled else None,
        "projection_mean": {
            head_key(l, h): {kind: finite(g.projection.mean()) for kind, g in group.groupby("name_kind")}
            for (l, h), group in frame.groupby(["layer", "head"], sort=False)
        },
        "n_prompts": len(ctx.ioi),
        "paper_rho_bound": PAPER_FIG3C_RHO,
        **_shape_summary(model, circuit),
    }
    meta = {"definition": "attention END->IO (IO rows) or END->S1 + END->S2 (S rows) vs. raw "
                          "<z[END,h] @ W_O[h], W_U[:, name]> (no final LN, no b_O); Pearson r "
                          "over the pooled IO and S points"}
    return ExperimentResult(frame, summary, meta)


def fig3c(model, ctx: RunContext) -> ExperimentResult:
    """Fig. 3c: attention vs. projection for each name mover of the circuit. The paper's
    "rho > 0.81" is for the plotted head (the paper code's call uses 9.9, the first name mover):
    ``plotted_head`` / ``correlation_plotted_head``; the other name movers are reported beside it."""
    circuit = ctx.circuit_for(model)
    heads = _class_heads(circuit, NAME_MOVER)
    result = _scatter_result(model, ctx, heads, NAME_MOVER, "name movers of the circuit")
    result.summary["correlation_min_over_name_movers"] = result.summary["correlation_min"]
    plotted = head_key(*heads[0]) if heads else None
    result.summary["plotted_head"] = plotted
    result.summary["correlation_plotted_head"] = (
        result.summary["correlation"].get(plotted) if plotted else None)
    return result


FIG16_N_HEADS = 4
# The four backup name movers the paper's Fig. 16 shows (App. F).
FIG16_PAPER_HEADS: tuple[tuple[int, int], ...] = ((10, 10), (10, 6), (10, 2), (11, 2))


def fig16_heads(circuit: Circuit) -> tuple[list[tuple[int, int]], str, str]:
    """(heads, class, note) of Fig. 16: for the paper circuit the paper's four (10.10, 10.6, 10.2,
    11.2); otherwise the first four backup name movers listed, else the negative name movers."""
    backups = _class_heads(circuit, BACKUP_NAME_MOVER)
    if backups and circuit.name == "paper" and set(FIG16_PAPER_HEADS) <= set(backups):
        return list(FIG16_PAPER_HEADS), BACKUP_NAME_MOVER, "the paper's Fig. 16 heads 10.10, 10.6, 10.2, 11.2"
    if backups:
        chosen = backups[:FIG16_N_HEADS]
        return chosen, BACKUP_NAME_MOVER, ("first backup name movers of the circuit: "
                                           + ", ".join(head_key(*h) for h in chosen))
    heads = _class_heads(circuit, NEGATIVE_NAME_MOVER)[:FIG16_N_HEADS]
    note = ("the circuit has no backup name movers: negative name movers shown instead"
            if heads else "the circuit has no backup or negative name movers")
    return heads, NEGATIVE_NAME_MOVER, note


def fig16(model, ctx: RunContext) -> ExperimentResult:
    """Fig. 16: the same scatter for 4 backup name movers (:func:`fig16_heads`: the paper's
    10.10, 10.6, 10.2, 11.2 for the paper circuit; the negative name movers if the circuit has no
    backups; recorded in ``heads`` / ``head_class`` / ``note``)."""
    circuit = ctx.circuit_for(model)
    heads, cls, note = fig16_heads(circuit)
    return _scatter_result(model, ctx, heads, cls, note)


# ------------------------------------------------------------------------------------------------
# Copy scores
# ------------------------------------------------------------------------------------------------

PAPER_COPY = {"name_mover_copy_score_above": 0.95, "negative_copy_score": 0.98,
              "average_copy_score_below": 0.20, "average_negative_copy_score": 0.12}


def _copy_score_breakdown(model, hits, dataset, circuit) -> dict:
    """Copy score of each name mover and negative copy score of each negative name mover, on each
    template's and each order's samples (its prompts' IO, S1, S2; Wilson 95% CI over the 3n samples,
    which treats the three samples of a prompt as independent). ``hits``: ``{negative: [head,
    sample]}`` per-sample hits of every head (layer-major) from :func:`copy_score_hits`, samples
    position-major (all IO, then all S1, then all S2); a group's score is the mean of its samples'
    hits (the same test on the same samples as scoring the group on its own)."""
    from ioi.breakdown import breakdown_many, group_labels, wilson_interval

    wanted = {False: _class_heads(circuit, NAME_MOVER), True: _class_heads(circuit, NEGATIVE_NAME_MOVER)}
    if not any(wanted.values()):
        return {}
    n = len(dataset)
    n_heads = model.cfg.n_heads
    per_head = {negative: {(l, h): hits[negative][l * n_heads + h].view(-1, n).cpu() for l, h in hs}
                for negative, hs in wanted.items()}  # [position, prompt] per head

    def compute(rows):
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        out = {}
        for negative, hs in wanted.items():
            for l, h in hs:
                chosen = per_head[negative][l, h][:, rows]
                total = int(chosen.numel())
                value = float(chosen.sum().float() / max(1, total))
                key = f"{'negative_copy_score' if negative else 'copy_score'}_{head_key(l, h)}"
                out[key] = {"value": finite(value), "ci": wilson_interval(value * total, total),
                            "n": int(len(rows))}
        return out

    return breakdown_many(compute, n, group_labels(dataset), statistic="fraction (Wilson CI)")


def copy_scores(model, ctx: RunContext) -> ExperimentResult:
    """The paper code's copy score and negative copy score of every head (§3.1)."""
    circuit = ctx.circuit_for(model)
    dataset = ctx.ioi
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    value_biases_unfolded = check_value_biases(model)
    positions = {key: dataset.word_idx[key] for key in ("IO", "S1", "S2")}
    resid, names = paper_copy_inputs(model, dataset.toks, positions)
    hits = copy_score_hits(model, resid, names)  # {negative: [head, sample]}, every head
    scores = {negative: score_grid(model, hit).double().cpu().numpy() for negative, hit in hits.items()}
    classes = class_of_heads(circuit, n_layers, n_heads)
    frame = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(n_layers), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "copy_score": scores[False].flatten(),
            "negative_copy_score": scores[True].flatten(),
        }
    )
    frame.insert(2, "class", [classes[head_key(l, h)] for l, h in zip(frame["layer"], frame["head"])])

    def class_min(cls: str, grid: np.ndarray):
        heads = _class_heads(circuit, cls)
        return finite(min(grid[l, h] for l, h in heads)) if heads else None

    summary = {
        "copy_score": per_head_dict(scores[False]),
        "negative_copy_score": per_head_dict(scores[True]),
        "copy_score_mean_all_heads": finite(np.nanmean(scores[False])),
        "negative_copy_score_mean_all_heads": finite(np.nanmean(scores[True])),
        "name_mover_copy_score_min": class_min(NAME_MOVER, scores[False]),
        "negative_name_mover_negative_copy_score_min": class_min(NEGATIVE_NAME_MOVER, scores[True]),
        "n_samples": int(resid.shape[0]),
        "value_biases_unfolded": bool(value_biases_unfolded),
        "paper": PAPER_COPY,
        "breakdown": _copy_score_breakdown(model, hits, dataset, circuit),
        **_shape_summary(model, circuit),
    }
    meta = {
        "definition": {
            "copy_score": copy_score_definition("paper", negative=False),
            "negative_copy_score": copy_score_definition("paper", negative=True),
        },
        "value_biases_unfolded": bool(value_biases_unfolded),
        "samples": "IO, S1 and S2 position of each p_IOI prompt (3N samples)",
    }
    return ExperimentResult(frame, summary, meta)


# ------------------------------------------------------------------------------------------------
# Repeated random tokens (App. H/I; Figs. 17, 18)
# ------------------------------------------------------------------------------------------------

REPEATED_SEQ_LEN = 100
REPEATED_VOCAB_RANGE = (1000, 10000)


def repeated_tokens(model, ctx: RunContext) -> ExperimentResult:
    """Previous-token, duplicate-token, induction and next-token scores of every head, per sequence
    of 100 random tokens repeated once (no BOS), averaged over ``ctx.n`` sequences."""
    circuit = ctx.circuit_for(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    tokens = generate_repeated_tokens(batch=ctx.n, seq_len=REPEATED_SEQ_LEN, seed=ctx.seed,
                                      vocab_range=REPEATED_VOCAB_RANGE, prepend_bos=False)
    names = set(repeated_token_hook_names(n_layers))
    per_sequence: dict[str, list[torch.Tensor]] = {name: [] for name in SCORE_NAMES}
    device = next(model.parameters()).device
    for row in range(tokens.shape[0]):
        seq = tokens[row : row + 1].to(device)
        cache = cache_activations(model, seq, sorted(names))
        scores = head_scores(model, seq, REPEATED_SEQ_LEN, cache=cache)
        del cache
        for name in SCORE_NAMES:
            per_sequence[name].append(scores[name])  # kept on the device: no sync per sequence
    arrays = {name: torch.stack(v).double().cpu().numpy() for name, v in per_sequence.items()}  # [n, layer, head]
    n = tokens.shape[0]
    classes = class_of_heads(circuit, n_layers, n_heads)
    frame = pd.DataFrame(
        {
            "sequence": np.repeat(np.arange(n), n_layers * n_heads),
            "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), n),
            "head": np.tile(np.tile(np.arange(n_heads), n_layers), n),
            **{name: arrays[name].reshape(n, -1).flatten() for name in SCORE_NAMES},
        }
    )
    frame.insert(3, "class", [classes[head_key(l, h)] for l, h in zip(frame["layer"], frame["head"])])
    summary = {
        **{name: per_head_dict(arrays[name].mean(0)) for name in SCORE_NAMES},
        "n_sequences": int(n),
        "seq_len": REPEATED_SEQ_LEN,
        "vocab_range": list(REPEATED_VOCAB_RANGE),
        "prepend_bos": False,
        **_shape_summary(model, circuit),
    }
    meta = {
        "definition": {
            "previous_token": "mean attention i -> i-1 over 1 <= i < 2*seq_len",
            "duplicate_token": "mean attention i -> i-seq_len over the second half",
            "induction": "mean attention i -> i-seq_len+1 over the second half",
            "next_token_contribution": "mean raw <z[i,h] @ W_O[h], W_U[:, tok[i+1]]> over second-half "
                                       "i < 2*seq_len-1 (no final LN, no b_O)",
        },
        "tokens": f"{n} sequences of {REPEATED_SEQ_LEN} uniform random ids in "
                  f"[{REPEATED_VOCAB_RANGE[0]}, {REPEATED_VOCAB_RANGE[1]}), repeated once, no BOS, "
                  f"seed {ctx.seed}",
    }
    return ExperimentResult(frame, summary, meta)

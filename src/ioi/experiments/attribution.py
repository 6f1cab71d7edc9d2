"""Where the logit difference is written (seed notebook "Logit Attribution" / "Attention Analysis";
paper §3.1): the logit lens, direct logit attribution per layer and per head, and the attention
patterns of the heads with the largest direct effect.

Every quantity is read at each prompt's own END (the " to" before the answer) of right-padded
batches; definitions are those of :mod:`ioi.analysis.logit_attribution`:

* ``logit_lens``: the accumulated residual stream (``0_pre, 0_mid, ..., final_post``) through the
  final LayerNorm with the cached END scale (the seed's ``apply_ln_to_stack``), dotted with
  ``W_U[IO] - W_U[S]`` (+ ``b_U[IO] - b_U[S]``); the last value is the model's logit difference. The
  "own LN" variant normalises each component with its own statistics.
* ``dla``: the same projection of each residual component (``embed``, ``pos_embed``, each layer's
  ``attn_out`` and ``mlp_out``, the constant ``b_U``), which sum exactly to the model's LD, and of
  each head's output ``z[END, h] @ W_O[h]`` (``b_O`` excluded; per-layer ``b_O`` reported apart).
* ``attn_patterns``: the mean attention pattern, over the prompts of the most frequent template (so
  positions align), of the 3 most positive and 3 most negative DLA heads.

Shared helpers for the other analysis experiments (:mod:`ioi.experiments.heads`) live here too.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ioi.analysis import dla_attn_bias, dla_per_head, dla_per_layer, top_heads
from ioi.analysis import logit_lens as lens_values
from ioi.analysis._common import model_device
from ioi.analysis.attention import pattern_hook_name
from ioi.analysis.logit_attribution import residual_hook_names
from ioi.circuits import Circuit
from ioi.experiments.core import ExperimentResult, RunContext
from ioi.forward import UNEMBED_INPUT, cache_activations, unembed_rows
from ioi.stats import bootstrap_ci

N_BOOTSTRAP = 1000
TOP_K_HEADS = 5  # heads listed as top positive / negative in the DLA summary
PATTERN_HEADS_PER_SIGN = 3  # seed notebook: top 3 positive and top 3 negative heads


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def head_key(layer: int, head: int) -> str:
    """``(9, 9)`` -> ``"9.9"`` (the summary's per-head key)."""
    return f"{int(layer)}.{int(head)}"


def per_head_dict(grid) -> dict[str, float | None]:
    """A ``[n_layers, n_heads]`` array as ``{"layer.head": value}`` (non-finite -> None)."""
    grid = np.asarray(torch.as_tensor(grid).detach().float().cpu(), dtype=float)
    return {head_key(l, h): finite(grid[l, h]) for l in range(grid.shape[0]) for h in range(grid.shape[1])}


def finite(value) -> float | None:
    """A JSON-safe float: NaN / inf become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def ci(values, seed: int) -> list[float | None]:
    """95% percentile bootstrap CI of the mean over the first axis (prompts), JSON-safe."""
    low, high = bootstrap_ci(np.asarray(values, dtype=float), n_resamples=N_BOOTSTRAP, seed=seed)
    return [finite(low), finite(high)]


def circuit_summary(circuit: Circuit) -> dict[str, Any]:
    """The circuit's heads by class (``{"name": ..., "classes": {class: ["9.9", ...]}}``), so that
    plotters can outline them without importing the model."""
    return {
        "name": circuit.name,
        "classes": {cls: [head_key(*h) for h in circuit.classes[cls]] for cls in circuit.class_names()},
    }


def class_of_heads(circuit: Circuit, n_layers: int, n_heads: int) -> dict[str, str]:
    """``{"layer.head": class or "other"}`` for every head of the model."""
    return {
        head_key(l, h): circuit.class_of((l, h)) or "other"
        for l in range(n_layers)
        for h in range(n_heads)
    }


def prompts_per_batch(model, seq_len: int, memory_budget_mb: int, *, resid_hooks_per_layer: int = 0,
                      patterns: bool = False) -> int:
    """Prompts per forward pass so logits (+ softmax), the cached residual-size hooks and, with
    ``patterns``, every attention pattern stay within the memory budget."""
    cfg = model.cfg
    per_position = 2 * cfg.d_vocab + (resid_hooks_per_layer * cfg.n_layers + 16) * cfg.d_model
    if patterns:
        per_position += cfg.n_layers * cfg.n_heads * seq_len
    return max(1, int(memory_budget_mb * 2**20 / (4 * seq_len * per_position)))


def dataset_batches(dataset, step: int) -> Iterator[tuple[int, Any]]:
    """``(first prompt index, sub-dataset)`` chunks of ``step`` prompts (padding trimmed)."""
    for start in range(0, len(dataset), step):
        yield start, dataset[start : start + step]


def run_at_end(model, sub, names: Sequence[str]):
    """Run ``model`` on a sub-dataset caching ``names``; return (per-prompt model LD at END, cache,
    END / IO / S tensors on the model's device)."""
    device = model_device(model)
    cache = cache_activations(model, sub.toks.to(device), [*dict.fromkeys(names), UNEMBED_INPUT])
    end = sub.word_idx["END"].to(device)
    io, s = sub.io_token_ids.to(device), sub.s_token_ids.to(device)
    rows = torch.arange(len(end), device=device)
    end_logits = unembed_rows(model, cache.pop(UNEMBED_INPUT)[rows, end]).float()
    ld = end_logits[rows, io] - end_logits[rows, s]
    return ld, cache, end, io, s


def _prompt_columns(sub, start: int, repeat: int = 1) -> dict[str, Any]:
    n = len(sub)
    return {
        "prompt": np.repeat(np.arange(start, start + n), repeat),
        "template": np.repeat(np.array(sub.template_ids), repeat),
    }


def _shape_summary(model, circuit: Circuit) -> dict[str, Any]:
    return {
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
        "circuit": circuit_summary(circuit),
    }


# ------------------------------------------------------------------------------------------------
# Logit lens
# ------------------------------------------------------------------------------------------------


def logit_lens(model, ctx: RunContext) -> ExperimentResult:
    """LD read off the accumulated residual stream at END, per prompt (seed notebook, logit lens)."""
    dataset = ctx.ioi
    names = residual_hook_names(model.cfg.n_layers)
    step = prompts_per_batch(model, dataset.max_len, ctx.memory_budget_mb, resid_hooks_per_layer=6)
    frames, cached_all, own_all, ld_all = [], [], [], []
    labels: list[str] = []
    for start, sub in dataset_batches(dataset, step):
        ld, cache, end, io, s = run_at_end(model, sub, names)
        cached, labels = lens_values(model, cache, end, io, s, per_prompt=True)
        own, _ = lens_values(model, cache, end, io, s, per_prompt=True, recompute_ln=True)
        del cache
        cached, own, ld = cached.cpu().double(), own.cpu().double(), ld.cpu().double()
        n_comp, n = cached.shape
        frames.append(
            pd.DataFrame(
                {
                    **_prompt_columns(sub, start, repeat=n_comp),
                    "component": np.tile(labels, n),
                    "component_index": np.tile(np.arange(n_comp), n),
                    "logit_diff": cached.T.flatten().numpy(),
                    "logit_diff_own_ln": own.T.flatten().numpy(),
                    "model_logit_diff": np.repeat(ld.numpy(), n_comp),
                }
            )
        )
        cached_all.append(cached.T.numpy())
        own_all.append(own.T.numpy())
        ld_all.append(ld.numpy())
    cached_np = np.concatenate(cached_all)  # [N, component]
    own_np = np.concatenate(own_all)
    ld_np = np.concatenate(ld_all)
    summary = {
        "labels": list(labels),
        "logit_diff_mean": [finite(v) for v in cached_np.mean(0)],
        "logit_diff_ci": [ci(cached_np[:, c], ctx.seed) for c in range(cached_np.shape[1])],
        "logit_diff_own_ln_mean": [finite(v) for v in own_np.mean(0)],
        "model_logit_diff_mean": finite(ld_np.mean()),
        "model_logit_diff_mean_ci": ci(ld_np, ctx.seed),
        "final_minus_model_max_abs": finite(np.abs(cached_np[:, -1] - ld_np).max()),
        "n_layers": int(model.cfg.n_layers),
    }
    meta = {"definition": "accumulated_resid(incl_mid) at END -> ln_final (cached END scale; "
                          "'own_ln': own statistics) -> . (W_U[IO] - W_U[S]) + b_U[IO] - b_U[S]"}
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary, meta)


# ------------------------------------------------------------------------------------------------
# Direct logit attribution
# ------------------------------------------------------------------------------------------------


def _dla_arrays(model, dataset, memory_budget_mb: int):
    """Per prompt: model LD [N], per-layer DLA [N, C] (+labels), per-head DLA [N, L, H],
    per-layer b_O DLA [N, L], and the batch starts (for the frame)."""
    names = residual_hook_names(model.cfg.n_layers)
    step = prompts_per_batch(model, dataset.max_len, memory_budget_mb, resid_hooks_per_layer=6)
    lds, layers, heads, biases = [], [], [], []
    labels: list[str] = []
    for _, sub in dataset_batches(dataset, step):
        ld, cache, end, io, s = run_at_end(model, sub, names)
        per_layer, labels = dla_per_layer(model, cache, end, io, s, per_prompt=True)
        per_head = dla_per_head(model, cache, end, io, s, per_prompt=True)
        bias = dla_attn_bias(model, cache, end, io, s, per_prompt=True)
        del cache
        lds.append(ld.cpu().double().numpy())
        layers.append(per_layer.cpu().double().T.numpy())
        heads.append(per_head.cpu().double().permute(2, 0, 1).numpy())
        biases.append(bias.cpu().double().T.numpy())
    return (np.concatenate(lds), np.concatenate(layers), list(labels), np.concatenate(heads),
            np.concatenate(biases))


def _component_layer(label: str) -> float:
    head = label.split("_")[0]
    return float(head) if head.isdigit() else float("nan")


def dla(model, ctx: RunContext) -> ExperimentResult:
    """Direct logit attribution at END: per residual component and per head (seed notebook)."""
    circuit = ctx.circuit_for(model)
    dataset = ctx.ioi
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    ld, layer_dla, labels, head_dla, bias_dla = _dla_arrays(model, dataset, ctx.memory_budget_mb)
    n, n_comp = layer_dla.shape
    templates = np.array(dataset.template_ids)
    prompt = np.arange(n)
    layer_frame = pd.DataFrame(
        {
            "prompt": np.repeat(prompt, n_comp),
            "template": np.repeat(templates, n_comp),
            "kind": "layer",
            "component": np.tile(labels, n),
            "component_index": np.tile(np.arange(n_comp), n),
            "layer": np.tile([_component_layer(l) for l in labels], n),
            "head": np.nan,
            "dla": layer_dla.flatten(),
            "logit_diff": np.repeat(ld, n_comp),
        }
    )
    n_cells = n_layers * n_heads
    head_frame = pd.DataFrame(
        {
            "prompt": np.repeat(prompt, n_cells),
            "template": np.repeat(templates, n_cells),
            "kind": "head",
            "component": np.tile([f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)], n),
            "component_index": np.tile(np.arange(n_cells), n),
            "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), n).astype(float),
            "head": np.tile(np.tile(np.arange(n_heads), n_layers), n).astype(float),
            "dla": head_dla.reshape(n, -1).flatten(),
            "logit_diff": np.repeat(ld, n_cells),
        }
    )
    bias_frame = pd.DataFrame(
        {
            "prompt": np.repeat(prompt, n_layers),
            "template": np.repeat(templates, n_layers),
            "kind": "attn_bias",
            "component": np.tile([f"{l}_b_O" for l in range(n_layers)], n),
            "component_index": np.tile(np.arange(n_layers), n),
            "layer": np.tile(np.arange(n_layers), n).astype(float),
            "head": np.nan,
            "dla": bias_dla.flatten(),
            "logit_diff": np.repeat(ld, n_layers),
        }
    )
    frame = pd.concat([layer_frame, head_frame, bias_frame], ignore_index=True)

    head_mean = torch.from_numpy(head_dla.mean(0))
    attn_out = np.stack([layer_dla[:, labels.index(f"{l}_attn_out")] for l in range(n_layers)], 1)
    summary = {
        "dla_layer_labels": labels,
        "dla_layer_mean": [finite(v) for v in layer_dla.mean(0)],
        "dla_layer_ci": [ci(layer_dla[:, c], ctx.seed) for c in range(n_comp)],
        "dla_head": per_head_dict(head_mean),
        "dla_attn_bias": [finite(v) for v in bias_dla.mean(0)],
        "top_positive_heads": [head_key(*h) for h in top_heads(head_mean, TOP_K_HEADS, largest=True)],
        "top_negative_heads": [head_key(*h) for h in top_heads(head_mean, TOP_K_HEADS, largest=False)],
        "logit_diff_mean": finite(ld.mean()),
        "dla_layer_sum_minus_logit_diff_max_abs": finite(np.abs(layer_dla.sum(1) - ld).max()),
        "heads_plus_b_O_minus_attn_out_max_abs": finite(
            np.abs(head_dla.sum(2) + bias_dla - attn_out).max()
        ),
        **_shape_summary(model, circuit),
    }
    meta = {"definition": "decompose_resid / stack_head_results at END -> ln_final (cached END "
                          "scale) -> . (W_U[IO] - W_U[S]); per-head outputs exclude b_O"}
    return ExperimentResult(frame, summary, meta)


# ------------------------------------------------------------------------------------------------
# Attention patterns of the top DLA heads
# ------------------------------------------------------------------------------------------------

ROLE_ORDER = ("IO", "S1", "S1+1", "S2", "END")


def modal_template_rows(dataset) -> tuple[str, list[int]]:
    """The most frequent template id (ties: the dataset's template order) and the indices of its
    prompts whose positions match its first prompt (same length, same IO/S1/S2/END)."""
    counts = Counter(dataset.template_ids)
    template = max(dataset.group_ids, key=lambda g: (counts[g], -dataset.group_ids.index(g)))
    rows = [i for i, t in enumerate(dataset.template_ids) if t == template]
    first = rows[0]
    lengths = dataset.prompt_lengths
    key = [int(dataset.word_idx[r][first]) for r in ROLE_ORDER]
    aligned = [
        i for i in rows
        if int(lengths[i]) == int(lengths[first]) and [int(dataset.word_idx[r][i]) for r in ROLE_ORDER] == key
    ]
    return template, aligned


def token_labels(tokenizer, ids: Sequence[int], roles: Mapping[str, int]) -> list[str]:
    """Readable per-position labels; the IOI positions are named by role (names vary per prompt)."""
    labels = [tokenizer.decode([int(t)]).replace("\n", "\\n") for t in ids]
    by_position: dict[int, list[str]] = {}
    for role, pos in roles.items():
        by_position.setdefault(int(pos), []).append(role)
    for pos, names in by_position.items():
        role = "/".join(names)
        labels[pos] = f"[{role}]" if role in ("IO", "S1", "S2") else f"{labels[pos].strip()} [{role}]"
    return labels


def attn_patterns(model, ctx: RunContext) -> ExperimentResult:
    """Mean attention pattern (one template, positions aligned) of the 3 most positive and the 3
    most negative DLA heads (seed notebook "Attention Analysis")."""
    circuit = ctx.circuit_for(model)
    dataset = ctx.ioi
    _, _, _, head_dla, _ = _dla_arrays(model, dataset, ctx.memory_budget_mb)
    head_mean = torch.from_numpy(head_dla.mean(0))
    k = min(PATTERN_HEADS_PER_SIGN, head_mean.numel())
    chosen = [(h, "positive") for h in top_heads(head_mean, k, largest=True)]
    chosen += [(h, "negative") for h in top_heads(head_mean, k, largest=False)]

    template, rows = modal_template_rows(dataset)
    sub = dataset[rows]
    end = int(sub.word_idx["END"][0])
    roles = {role: int(sub.word_idx[role][0]) for role in ROLE_ORDER}
    labels = token_labels(model.tokenizer, sub.toks[0, : end + 1].tolist(), roles)
    layers = sorted({layer for (layer, _), _ in chosen})
    names = [pattern_hook_name(layer) for layer in layers]
    step = prompts_per_batch(model, sub.max_len, ctx.memory_budget_mb, patterns=True)
    sums = {layer: None for layer in layers}
    for _, chunk in dataset_batches(sub, step):
        _, cache, *_ = run_at_end(model, chunk, names)
        for layer in layers:
            pattern = cache[pattern_hook_name(layer)][:, :, : end + 1, : end + 1].double().sum(0)
            sums[layer] = pattern if sums[layer] is None else sums[layer] + pattern  # on the device
        del cache
    sums = {layer: total.cpu() for layer, total in sums.items()}  # one copy per layer, after the loop
    n_rows = len(sub)
    frames, heads_info = [], []
    positions = np.arange(end + 1)
    for rank, ((layer, head), sign) in enumerate(chosen):
        mean_pattern = (sums[layer][head] / n_rows).numpy()
        frames.append(
            pd.DataFrame(
                {
                    "rank": rank,
                    "layer": layer,
                    "head": head,
                    "sign": sign,
                    "query": np.repeat(positions, end + 1),
                    "key": np.tile(positions, end + 1),
                    "query_label": np.repeat(labels, end + 1),
                    "key_label": np.tile(labels, end + 1),
                    "attention": mean_pattern.flatten(),
                }
            )
        )
        heads_info.append(
            {
                "head": head_key(layer, head),
                "sign": sign,
                "dla": finite(head_mean[layer, head]),
                "class": circuit.class_of((layer, head)) or "other",
                "end_to_io": finite(mean_pattern[end, roles["IO"]]),
                "end_to_s1": finite(mean_pattern[end, roles["S1"]]),
                "end_to_s2": finite(mean_pattern[end, roles["S2"]]),
            }
        )
    summary = {
        "heads": heads_info,
        "template": template,
        "n_prompts_template": n_rows,
        "token_labels": labels,
        "roles": roles,
        "example_sentence": sub.sentences[0],
        "dla_head": per_head_dict(head_mean),
        **_shape_summary(model, circuit),
    }
    meta = {"template": template, "prompts": [int(r) for r in rows]}
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary, meta)

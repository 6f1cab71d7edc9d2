"""Attention patterns of every circuit head, class by class, for the interactive page (seed notebook
"Attention Analysis", which shows them with circuitsvis).

``class_attention_patterns``: for each head of the model's circuit (the paper's 26 heads for GPT-2,
the planted heads for ``planted-ioi``), the attention pattern ``blocks.{l}.attn.hook_pattern[h]``
(query = destination, key = source) over positions 0..END of

* ``mean``: the mean over the prompts of the most frequent template whose positions align with its
  first prompt (the same prompts as ``attn_patterns``; tokens labelled by IOI role), and
* ``prompt``: that first prompt alone, with its own tokens.

The figure job (:mod:`ioi.plots.interactive`) turns them into one self-contained HTML page.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ioi.analysis.attention import pattern_hook_name
from ioi.experiments.attribution import (
    ROLE_ORDER,
    _shape_summary,
    dataset_batches,
    head_key,
    modal_template_rows,
    prompts_per_batch,
    run_at_end,
    token_labels,
)
from ioi.experiments.core import ExperimentResult, RunContext


def class_attention_patterns(model, ctx: RunContext) -> ExperimentResult:
    """Mean (one template, positions aligned) and single-prompt attention patterns of every
    circuit head, with the circuit class of each."""
    circuit = ctx.circuit_for(model)
    heads = [(cls, head) for cls in circuit.classes for head in circuit.classes[cls]]
    template, rows = modal_template_rows(ctx.ioi)
    sub = ctx.ioi[rows]
    end = int(sub.word_idx["END"][0])
    roles = {role: int(sub.word_idx[role][0]) for role in ROLE_ORDER}
    first_ids = sub.toks[0, : end + 1].tolist()
    labels = token_labels(model.tokenizer, first_ids, roles)
    prompt_tokens = [model.tokenizer.decode([int(t)]) for t in first_ids]
    layers = sorted({layer for _, (layer, _) in heads})
    names = [pattern_hook_name(layer) for layer in layers]
    step = prompts_per_batch(model, sub.max_len, ctx.memory_budget_mb, patterns=True)
    sums: dict[int, torch.Tensor] = {}  # on the model's device until the loop is done
    first: dict[int, torch.Tensor] = {}
    for start, chunk in dataset_batches(sub, step):
        _, cache, *_ = run_at_end(model, chunk, names)
        for layer in layers:
            pattern = cache[pattern_hook_name(layer)][:, :, : end + 1, : end + 1].double()
            sums[layer] = pattern.sum(0) + sums[layer] if layer in sums else pattern.sum(0)
            if start == 0:
                first[layer] = pattern[0]
        del cache
    sums = {layer: total.cpu().numpy() for layer, total in sums.items()}
    first = {layer: row.cpu().numpy() for layer, row in first.items()}
    positions = np.arange(end + 1)
    frames = []
    for cls, (layer, head) in heads:
        for view, matrix in (("mean", sums[layer][head] / len(sub)), ("prompt", first[layer][head])):
            frames.append(pd.DataFrame({
                "class": cls, "layer": layer, "head": head, "view": view,
                "query": np.repeat(positions, end + 1), "key": np.tile(positions, end + 1),
                "attention": matrix.flatten(),
            }))
    summary = {
        "heads": [{"head": head_key(layer, head), "class": cls} for cls, (layer, head) in heads],
        "template": template,
        "n_prompts_template": len(sub),
        "token_labels": labels,
        "prompt_tokens": prompt_tokens,
        "roles": roles,
        "example_sentence": sub.sentences[0],
        **_shape_summary(model, circuit),
    }
    meta = {"template": template, "prompts": [int(r) for r in rows]}
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary, meta)

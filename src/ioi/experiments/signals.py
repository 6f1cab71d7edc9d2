"""Token and position signals (paper App. A, Figs. 9 and 10) and adversarial examples (§4.4, App. L,
Fig. 8).

``signals``: six signal-specific datasets, all built from ``ctx.ioi`` and position-aligned with it
(name-pattern flips of :meth:`ioi.data.IOIDataset.gen_flipped_prompts`; the left part applies to
ABBA prompts, whose first three name slots read IO S1 S2 = A B B, the right part to BABA prompts,
S1 IO S2 = B A B):

==================  ==========================  =========================================
cell                flip                        signals carried by S2 (token, position)
==================  ==========================  =========================================
orig_tok_orig_pos   none (p_IOI itself)         S's token, S1's position
rand_tok_orig_pos   "ABB->CDD, BAB->DCD"        a random name, S1's position
inv_tok_orig_pos    "ABB->BAA, BAB->ABA"        IO's token, S1's position (names swapped)
orig_tok_inv_pos    "ABB->BAB, BAB->ABB"        S's token, IO's position (IO<->S1 swap)
rand_tok_inv_pos    "ABB->DCD, BAB->CDD"        a random name, IO's position
inv_tok_inv_pos     "ABB->ABA, BAB->BAA"        IO's token, IO's position (S2 := IO)
==================  ==========================  =========================================

The random-token datasets use the string flips above (every name replaced by fresh random names,
consistently across occurrences) rather than the paper code's ``("IO","RAND")``+``("S","RAND")``
chain (DCC / CDC); both give the same token/position structure, with fresh names that never collide.

The outputs (``hook_z``) of the circuit's S-inhibition heads at END are taken from a run on each
dataset and patched into the run on p_IOI (activation patching: everything downstream recomputed);
the logit difference is read w.r.t. p_IOI's own IO and S. The six mean LDs are fitted by least
squares with ``LD ≈ a·S_pos + b·S_tok`` (S_tok = 1 / 0 / -1 for original / random / inverted,
S_pos = 1 / -1; no intercept, as the paper's 2.31 S_pos + 0.99 S_tok). Fig. 10: the name movers'
attention from END to IO, S1 and S2 in the same patched runs.

``adversarial``: p_IOI, and p_IOI with one natural sentence naming IO (or, as the control, S)
inserted right after the first clause's terminating "." (else its last ",") before S2, as the paper
code does (``word_idx["punct"]``). One sentence per prompt (the paper's example; ``variant:
single``), drawn from App. L's five with a seeded generator, the same one for the IO and S versions
of a prompt. The double-sentence variant (keys ``extra_io_double`` / ``extra_s_double``) is the
paper code's final call (``advex.py``: ``gen_adv(ioi_dataset, model, DOUBLE_ADX_TEMPLATE)``, two of
App. L's sentences drawn uniformly from the 25 ordered pairs, both naming the same name). Both
variants are run; ``FIG8_VARIANT = "double"`` is the one the paper code's last cell produced, so it
is the default behind Fig. 8's comparison (``fig8_extra_io`` / ``fig8_extra_s``, and the claims);
the single-sentence variant (the paper's printed example, App. L Fig. 21) stays in ``extra_io`` /
``extra_s`` as the named alternative.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ioi.paper_values import PAPER_FIG8, PAPER_FIG9  # noqa: F401  (re-exported)
from ioi.analysis.attention import pattern_hook_name
from ioi.breakdown import breakdown_mean, group_labels
from ioi.circuits import NAME_MOVER, S_INHIBITION
from ioi.experiments.attribution import circuit_summary, finite, head_key
from ioi.experiments.circuit_eval import EndLogitDiff, mean_and_ci, mean_ci
from ioi.experiments.core import ExperimentResult, RunContext, batch_size_for
from ioi import plain_forward
from ioi.forward import batch_size_for as end_logits_batch_size
from ioi.forward import cache_activations, end_logits, use_plain_forward
from ioi.metrics import logit_diff_from_end_logits

# ------------------------------------------------------------------------------------------------
# Signals (App. A, Figs. 9, 10)
# ------------------------------------------------------------------------------------------------

# cell -> (flip or None, S_tok, S_pos)
SIGNAL_CELLS: dict[str, tuple[str | None, int, int]] = {
    "orig_tok_orig_pos": (None, 1, 1),
    "orig_tok_inv_pos": ("ABB->BAB, BAB->ABB", 1, -1),
    "rand_tok_orig_pos": ("ABB->CDD, BAB->DCD", 0, 1),
    "rand_tok_inv_pos": ("ABB->DCD, BAB->CDD", 0, -1),
    "inv_tok_orig_pos": ("ABB->BAA, BAB->ABA", -1, 1),
    "inv_tok_inv_pos": ("ABB->ABA, BAB->BAA", -1, -1),
}
TOKEN_LABELS = {1: "original S token", 0: "random token", -1: "S<->IO inverted token"}
POSITION_LABELS = {1: "original position", -1: "inverted position"}
NM_ATTENTION_CELLS = ("rand_tok_orig_pos", "inv_tok_inv_pos")  # Fig. 10 left / right

PAPER_FIT = {"fit_position_coefficient": 2.31, "fit_token_coefficient": 0.99, "fit_mean_relative_error": 0.07}
PAPER_SIGNALS_SOURCE = "Paper App. A, Fig. 9 (verbatim in ioi_paper.md §4.6); GPT-2 small"


def signal_datasets(ioi) -> dict[str, Any]:
    """The six signal-specific datasets (see the module docstring), position-aligned with ``ioi``."""
    return {cell: ioi if flip is None else ioi.gen_flipped_prompts(flip)
            for cell, (flip, _, _) in SIGNAL_CELLS.items()}


def fit_signals(cells: dict[str, float]) -> dict[str, float]:
    """Least squares ``LD ≈ a S_pos + b S_tok`` over the six cells; mean |error| / |baseline|."""
    names = list(SIGNAL_CELLS)
    design = np.array([[SIGNAL_CELLS[c][2], SIGNAL_CELLS[c][1]] for c in names], dtype=float)
    target = np.array([cells[c] for c in names], dtype=float)
    (a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
    predicted = design @ np.array([a, b])
    baseline = abs(cells["orig_tok_orig_pos"])
    error = np.abs(predicted - target).mean()
    return {
        "fit_position_coefficient": float(a),
        "fit_token_coefficient": float(b),
        "fit_mean_abs_error": float(error),
        "fit_mean_relative_error": float(error / baseline) if baseline else float("nan"),
        "fit_predicted": {c: float(p) for c, p in zip(names, predicted)},
    }


def _patch_z_at_end(heads_by_layer: dict[int, list[int]], source_z: dict[int, torch.Tensor],
                    end: torch.Tensor):
    """``rows -> hooks`` replacing z[prompt, END, head] by the source run's value."""

    def hooks_for_rows(rows: slice) -> list:
        hooks = []
        for layer, heads in heads_by_layer.items():
            src = source_z[layer][rows]
            end_rows = end[rows]
            idx = torch.arange(end_rows.shape[0], device=end_rows.device)
            head_idx = torch.tensor(heads, device=end_rows.device)

            def hook(z, hook, src=src, end_rows=end_rows, idx=idx, head_idx=head_idx):
                z = z.clone()
                z[idx[:, None], end_rows[:, None], head_idx[None, :]] = src[idx[:, None], end_rows[:, None], head_idx[None, :]].to(z.dtype)
                return z

            hooks.append((f"blocks.{layer}.attn.hook_z", hook))
        return hooks

    return hooks_for_rows


def _attention_capture(nm_heads: Sequence[tuple[int, int]], end: torch.Tensor,
                       keys: dict[str, torch.Tensor], store: dict[tuple[int, int, str], torch.Tensor]):
    """``rows -> hooks`` storing each name mover's attention END -> each key position, as
    ``store[(first row, layer, key)] = [batch, heads of that layer]``."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in nm_heads:
        by_layer.setdefault(layer, []).append(head)

    def hooks_for_rows(rows: slice) -> list:
        hooks = []
        end_rows = end[rows]
        idx = torch.arange(end_rows.shape[0], device=end_rows.device)
        for layer, heads in by_layer.items():
            def hook(pattern, hook, layer=layer, heads=heads, end_rows=end_rows, idx=idx):
                at_end = pattern[idx, :, end_rows][:, heads]  # [batch, heads, key]
                for name, positions in keys.items():
                    value = at_end[idx, :, positions[rows].to(at_end.device)]  # [batch, heads]
                    store[(rows.start, layer, name)] = value.double().cpu()
                return pattern

            hooks.append((pattern_hook_name(layer), hook))
        return hooks

    return hooks_for_rows


def _mean_attention(store: dict[tuple[int, int, str], torch.Tensor], key: str) -> np.ndarray:
    """Per prompt: the mean over the name movers of their attention END -> ``key``."""
    starts = sorted({s for s, _, k in store if k == key})
    chunks = []
    for start in starts:
        per_layer = [v for (s, _, k), v in sorted(store.items(), key=lambda kv: kv[0][:2])
                     if s == start and k == key]
        chunks.append(torch.cat(per_layer, dim=1))
    return torch.cat(chunks).mean(1).numpy()


def _plain_cell(end_run, heads_by_layer: dict[int, list[int]], nm_heads: Sequence[tuple[int, int]],
                keys: dict[str, torch.Tensor], io: torch.Tensor, s: torch.Tensor):
    """``source_z -> (LD [N], {key: mean name-mover attention END -> key [N]})`` on the plain
    forward: what ``run_cell`` computes with hooks (z of the S-inhibition heads at END from
    ``source_z``, or nothing patched; the name movers' patterns read at END), with every row but
    END taken from the clean run."""
    rows = end_run.rows
    nm_layers = sorted({layer for layer, _ in nm_heads})

    def cell(source_z: dict[int, torch.Tensor] | None = None):
        z_at_end = {}
        if source_z is not None:
            for layer, heads in heads_by_layer.items():
                z = source_z[layer].to(rows.device)
                z_at_end[layer] = (heads, z[rows, end_run.end][:, heads])
        start = min([*z_at_end, *nm_layers], default=end_run.net.n_layers)
        final, patterns = end_run.resume(start, z_at_end, nm_layers)
        ld = end_run.answer_logit_diff(final, io, s).double().cpu().numpy()
        attention = {}
        if nm_heads:
            for key, positions in keys.items():
                per_head = [patterns[layer][rows, head, positions.to(rows.device)] for layer, head in
                            sorted(nm_heads, key=lambda lh: lh[0])]
                attention[key] = torch.stack(per_head, 1).double().cpu().mean(1).numpy()
        return ld, attention

    return cell


def _z_cache(model, dataset, layers: Sequence[int], memory_budget_mb: int,
             seq: int | None = None) -> dict[int, torch.Tensor]:
    """``layer -> hook_z [N, seq, n_heads, d_head]`` on ``dataset`` cut to its first ``seq``
    positions (``None``: all; nothing after the last END is read, causal attention)."""
    names = {f"blocks.{l}.attn.hook_z": l for l in layers}
    device = model.W_U.device
    seq = dataset.toks.shape[1] if seq is None else seq
    step = batch_size_for(model, seq, memory_budget_mb)
    parts: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for start in range(0, len(dataset), step):
        cache = cache_activations(model, dataset.toks[start : start + step, :seq].to(device), list(names))
        for name, layer in names.items():
            parts[layer].append(cache[name])
        del cache
    return {l: torch.cat(p) for l, p in parts.items()}


def signals(model, ctx: RunContext) -> ExperimentResult:
    """App. A / Figs. 9-10: patch the S-inhibition heads' END outputs from six signal-specific
    datasets into p_IOI; LD per cell, the linear fit, and the name movers' attention."""
    circuit = ctx.circuit_for(model)
    sinh = [tuple(map(int, h)) for h in circuit.classes.get(S_INHIBITION, ())]
    if not sinh:
        raise ValueError(f"Circuit {circuit.name!r} has no 's-inhibition' heads to patch.")
    nm_heads = [tuple(map(int, h)) for h in circuit.classes.get(NAME_MOVER, ())]
    ioi = ctx.ioi
    device = model.W_U.device
    heads_by_layer: dict[int, list[int]] = {}
    for layer, head in sinh:
        heads_by_layer.setdefault(layer, []).append(head)
    plain = plain_forward.unavailable_reason(model) is None
    # (its bridge check is skipped when the plain forward serves every cell: the runner is not run)
    ld_runner = EndLogitDiff(model, ioi, memory_budget_mb=ctx.memory_budget_mb, fast=not plain)
    end = ioi.word_idx["END"].to(device)
    keys = {k: ioi.word_idx[k].to(device) for k in ("IO", "S1", "S2")}

    def run_cell(hooks_for_rows=None):
        store: dict[tuple[int, int, str], torch.Tensor] = {}
        capture = _attention_capture(nm_heads, end, keys, store) if nm_heads else None

        def hooks(rows):
            out = [] if hooks_for_rows is None else hooks_for_rows(rows)
            return out + (capture(rows) if capture is not None else [])

        ld = ld_runner.run(hooks).numpy()
        attention = {k: _mean_attention(store, k) for k in keys} if nm_heads else {}
        return ld, attention

    if plain:  # the same numbers without hooks: only END rows change (plain_forward.EndRun)
        end_run = plain_forward.EndRun(plain_forward.weights(model), ld_runner.toks, end)
        plain_cell = _plain_cell(end_run, heads_by_layer, nm_heads, keys, ioi.io_token_ids, ioi.s_token_ids)

    clean_ld, clean_attention = plain_cell() if plain else run_cell()
    datasets = signal_datasets(ioi)
    frames, cells, cell_ci, attention_summary = [], {}, {}, {}
    for cell, dataset in datasets.items():
        _, s_tok, s_pos = SIGNAL_CELLS[cell]
        source_z = _z_cache(model, dataset, list(heads_by_layer), ctx.memory_budget_mb, ld_runner.seq)
        ld, attention = plain_cell(source_z) if plain else run_cell(_patch_z_at_end(heads_by_layer, source_z, end))
        cells[cell] = finite(ld.mean())
        cell_ci[cell] = mean_ci(ld, ctx.seed)
        frames.append(pd.DataFrame({
            "prompt": np.arange(len(ioi)), "template": ioi.template_ids, "cell": cell,
            "token_signal": s_tok, "position_signal": s_pos, "flip": SIGNAL_CELLS[cell][0] or "none",
            "source_sentence": dataset.sentences, "logit_diff": ld, "clean_logit_diff": clean_ld,
            **{f"nm_end_to_{k.lower()}": attention.get(k, np.full(len(ioi), np.nan)) for k in keys},
            **{f"nm_end_to_{k.lower()}_clean": clean_attention.get(k, np.full(len(ioi), np.nan)) for k in keys},
        }))
        if nm_heads:
            attention_summary[cell] = {
                k.lower(): {"mean": finite(attention[k].mean()), "std": finite(attention[k].std(ddof=1))
                            if len(ioi) > 1 else None} for k in keys}
    if nm_heads:
        attention_summary["clean"] = {
            k.lower(): {"mean": finite(clean_attention[k].mean()),
                        "std": finite(clean_attention[k].std(ddof=1)) if len(ioi) > 1 else None}
            for k in keys}
    fit = fit_signals(cells)
    labels = group_labels(ioi)
    cell_breakdown = {
        f"cell_{cell}": breakdown_mean(frame["logit_diff"].to_numpy(), labels, seed=ctx.seed,
                                       definition=f"mean LD after patching the S-inhibition heads from {cell}")
        for cell, frame in zip(datasets, frames)
    }
    summary: dict[str, Any] = {
        "cells": cells,
        "cell_ci": cell_ci,
        **mean_and_ci("clean_logit_diff_mean", clean_ld, ctx.seed),
        "orig_orig_minus_clean_max_abs": finite(np.abs(frames[0]["logit_diff"] - clean_ld).max()),
        **{k: finite(v) for k, v in fit.items() if k != "fit_predicted"},
        "fit_predicted": fit["fit_predicted"],
        "nm_attention": {c: attention_summary[c] for c in ("clean", *NM_ATTENTION_CELLS)} if nm_heads else {},
        "nm_attention_all_cells": attention_summary,
        "patched_heads": [head_key(*h) for h in sinh],
        "name_mover_heads": [head_key(*h) for h in nm_heads],
        "breakdown": cell_breakdown,
        "cell_signals": {c: {"token": t, "position": p, "flip": f or "none"}
                         for c, (f, t, p) in SIGNAL_CELLS.items()},
        "circuit": circuit_summary(circuit),
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
    }
    if circuit.name == "paper":
        summary["paper_reference"] = {"cells": dict(PAPER_FIG9), **PAPER_FIT, "source": PAPER_SIGNALS_SOURCE}
    meta = {
        "definition": "activation patching of the S-inhibition heads' hook_z at each prompt's END from "
                      "a run on the signal-specific dataset into the run on p_IOI; everything "
                      "downstream recomputed; LD w.r.t. p_IOI's IO and S",
        "random_token_construction": "string flips 'ABB->CDD, BAB->DCD' / 'ABB->DCD, BAB->CDD' "
                                     "(not the paper code's DCC/CDC tuple chain; same structure)",
        "flips": {c: f or "none" for c, (f, _, _) in SIGNAL_CELLS.items()},
        "dataset_hashes": {c: d.content_hash() for c, d in datasets.items()},
        "ci": "cell_ci: 95% percentile bootstrap over prompts (named cell_ci, not cells_ci: a "
              "'<key>_ci' beside a dict is read by ioi.comparison as one [low, high] pair)",
    }
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary, meta)


# ------------------------------------------------------------------------------------------------
# Adversarial examples (§4.4, App. L, Fig. 8)
# ------------------------------------------------------------------------------------------------

ADVERSARIAL_SENTENCES = (
    " [A] had a good day.",
    " [A] was enjoying the situation.",
    " [A] was tired.",
    " [A] enjoyed being with a friend.",
    " [A] was an enthusiast person.",
)
PAPER_FIG8_SOURCE = "Paper Fig. 8 (verbatim in ioi_paper.md §4.9); GPT-2 small, N = 500 in the paper code"
VARIANTS = ("clean", "extra_io", "extra_s", "extra_io_double", "extra_s_double")
# The variant the paper code's final cell ran (DOUBLE_ADX_TEMPLATE), compared with Fig. 8.
FIG8_VARIANT = "double"
FIG8_KEYS = {"single": {"extra_io": "extra_io", "extra_s": "extra_s"},
             "double": {"extra_io": "extra_io_double", "extra_s": "extra_s_double"}}


def _punctuation_ids(tokenizer) -> tuple[int, int]:
    period, comma = tokenizer.encode("."), tokenizer.encode(",")
    if len(period) != 1 or len(comma) != 1:
        raise ValueError("'.' and ',' must be single tokens for the adversarial insertion.")
    return period[0], comma[0]


def insertion_index(ids: Sequence[int], s2: int, period: int, comma: int) -> int:
    """Token index of the first clause's terminator: the last "." before S2, else its last ","."""
    before = list(ids[:s2])
    for punct in (period, comma):
        if punct in before:
            return len(before) - 1 - before[::-1].index(punct)
    raise ValueError("No '.' or ',' before S2: cannot insert an adversarial sentence.")


def build_adversarial(dataset, sentences: Sequence[Sequence[str]], name_of: str) -> dict[str, Any]:
    """New token sequences: each prompt of ``dataset`` with ``sentences[i]`` (templates with [A])
    filled with its IO (``name_of="io"``) or S name inserted after the first clause's terminator.

    Returns ``toks`` [N, max_len] (right-padded), ``end`` and ``s2`` positions, ``insert_at`` (index
    of the first inserted token), ``n_inserted`` and ``texts`` (the decoded prompt up to END).
    """
    tokenizer = dataset.tokenizer
    period, comma = _punctuation_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, ends, s2s, inserts, counts, texts = [], [], [], [], [], []
    for i, prompt in enumerate(dataset.prompts):
        ids = dataset.toks[i, : int(dataset.prompt_lengths[i])].tolist()
        s2, end = int(dataset.word_idx["S2"][i]), int(dataset.word_idx["END"][i])
        cut = insertion_index(ids, s2, period, comma) + 1
        name = prompt.io if name_of == "io" else prompt.s
        text = "".join(t.replace("[A]", name) for t in sentences[i])
        inserted = tokenizer.encode(text)
        new = ids[:cut] + inserted + ids[cut:]
        # The insertion must not change how the rest tokenises (GPT-2 splits before spaces).
        bos = 1 if dataset.prepend_bos else 0
        check = ids[:bos] + tokenizer.encode(tokenizer.decode(new[bos:]))
        if check != new:
            raise ValueError(f"Prompt {i}: inserting {text!r} changes the tokenisation.")
        rows.append(new)
        ends.append(end + len(inserted))
        s2s.append(s2 + len(inserted))
        inserts.append(cut)
        counts.append(len(inserted))
        texts.append(tokenizer.decode(new[bos : end + len(inserted) + 1]))
    width = max(len(r) for r in rows)
    # Built on the CPU like a dataset's tokens (the forward passes move them to the model's device).
    toks = torch.full((len(rows), width), pad, dtype=torch.long, device="cpu")
    for i, r in enumerate(rows):
        toks[i, : len(r)] = torch.tensor(r, device="cpu")
    return {"toks": toks, "end": torch.tensor(ends, device="cpu"), "s2": torch.tensor(s2s, device="cpu"),
            "insert_at": torch.tensor(inserts, device="cpu"), "n_inserted": torch.tensor(counts, device="cpu"),
            "texts": texts}


def _chunk_metrics(at_end, io, s) -> tuple[torch.Tensor, torch.Tensor]:
    """(LD, IO probability) per prompt from its END logits, as float64 on the CPU."""
    idx = torch.arange(at_end.shape[0], device=at_end.device)
    return (logit_diff_from_end_logits(at_end, io, s).double().cpu(),
            at_end.softmax(-1)[idx, io.to(at_end.device)].double().cpu())


def _as_metrics(lds, probs) -> dict[str, np.ndarray]:
    ld = torch.cat(lds).numpy()
    return {"logit_diff": ld, "io_prob": torch.cat(probs).numpy(), "s_over_io": (ld < 0).astype(float)}


def _metrics(model, toks, end, io, s, memory_budget_mb: int) -> dict[str, np.ndarray]:
    """LD, IO probability and S>IO per prompt at its END (hook-free: the plain forward, in chunks
    of at most ``memory_budget_mb``; :func:`ioi.forward.end_logits` never unembeds other rows)."""
    device = model.W_U.device
    step = end_logits_batch_size(model, toks.shape[1], memory_budget_mb)
    lds, probs = [], []
    for start in range(0, toks.shape[0], step):
        rows = slice(start, start + step)
        at_end = end_logits(model, toks[rows], end[rows], memory_budget_mb=None).to(device)
        ld, prob = _chunk_metrics(at_end, io[rows], s[rows])
        lds.append(ld)
        probs.append(prob)
    return _as_metrics(lds, probs)


def _metrics_shared_prefix(model, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix_len, io, s,
                           memory_budget_mb: int) -> dict[str, dict[str, np.ndarray]]:
    """:func:`_metrics` of every prompt set in ``sets`` (``name -> (toks, end)``), whose prompt
    ``i`` all begin with the first clause of p_IOI's prompt ``i`` (``prefix_len[i]`` tokens): the
    plain forward runs that prefix once per prompt for all sets
    (:func:`ioi.plain_forward.end_logits_shared_prefix`; the same logits to float32 rounding)."""
    device = model.W_U.device
    net = plain_forward.weights(model)
    names = list(sets)
    # The budget's prompts count a full vocabulary row per position; here every set's END row of a
    # chunk exists at once (len(sets) rows per prompt, fewer than the positions counted).
    step = end_logits_batch_size(model, max(t.shape[1] for t, _ in sets.values()), memory_budget_mb)
    lds: dict[str, list] = {name: [] for name in names}
    probs: dict[str, list] = {name: [] for name in names}
    for start in range(0, len(prefix_len), step):
        rows = slice(start, start + step)
        logits = plain_forward.end_logits_shared_prefix(
            net, [sets[name][0][rows] for name in names], [sets[name][1][rows] for name in names],
            prefix_len[rows], step)
        for name, at_end in zip(names, logits):
            ld, prob = _chunk_metrics(at_end.to(device), io[rows], s[rows])
            lds[name].append(ld)
            probs[name].append(prob)
    return {name: _as_metrics(lds[name], probs[name]) for name in names}


def _variant_summary(values: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    return {
        **mean_and_ci("logit_diff_mean", values["logit_diff"], seed),
        **mean_and_ci("io_prob_mean", values["io_prob"], seed),
        **mean_and_ci("s_over_io_rate", values["s_over_io"], seed),
        "n": int(len(values["logit_diff"])),
    }


def adversarial_metrics(model, ioi, built: dict[str, dict[str, Any]], memory_budget_mb: int,
                        shared_prefix: bool | None = None) -> dict[str, dict[str, np.ndarray]]:
    """:func:`_metrics` of p_IOI (``"clean"``) and of each :func:`build_adversarial` variant.

    Every variant of prompt ``i`` begins with p_IOI's first clause (its tokens up to
    ``insert_at[i]``, the same in every variant): with the plain forward (``shared_prefix=None``:
    when it serves the model) that prefix is run once for all five sets, about a third of the
    forward's rows (:func:`_metrics_shared_prefix`); ``shared_prefix=False`` runs each set on its
    own (the reference: the same numbers to float32 rounding, tests)."""
    io, s = ioi.io_token_ids, ioi.s_token_ids
    if shared_prefix is None:
        shared_prefix = use_plain_forward(model)
    if not shared_prefix or not built:
        results = {"clean": _metrics(model, ioi.toks, ioi.word_idx["END"], io, s, memory_budget_mb)}
        for variant, parts in built.items():
            results[variant] = _metrics(model, parts["toks"], parts["end"], io, s, memory_budget_mb)
        return results
    prefix_len = next(iter(built.values()))["insert_at"]
    if any(not torch.equal(parts["insert_at"], prefix_len) for parts in built.values()):
        raise ValueError("adversarial variants insert at different positions: no shared prefix.")
    sets = {"clean": (ioi.toks, ioi.word_idx["END"]),
            **{variant: (parts["toks"], parts["end"]) for variant, parts in built.items()}}
    return _metrics_shared_prefix(model, sets, prefix_len, io, s, memory_budget_mb)


def adversarial(model, ctx: RunContext) -> ExperimentResult:
    """Fig. 8: LD, IO probability and S>IO rate on p_IOI and with one (``extra_io`` / ``extra_s``) or
    two (``extra_io_double`` / ``extra_s_double``, the paper code's final call) natural sentences
    naming IO (or S, the control) inserted after the first clause; ``fig8_extra_io`` /
    ``fig8_extra_s`` = the variant compared with Fig. 8 (``FIG8_VARIANT``)."""
    ioi = ctx.ioi
    n = len(ioi)
    rng = np.random.default_rng([int(ctx.seed), 8])
    single = [[ADVERSARIAL_SENTENCES[int(k)]] for k in rng.integers(len(ADVERSARIAL_SENTENCES), size=n)]
    double = [[ADVERSARIAL_SENTENCES[int(a)], ADVERSARIAL_SENTENCES[int(b)]]
              for a, b in rng.integers(len(ADVERSARIAL_SENTENCES), size=(n, 2))]
    built = {
        "extra_io": build_adversarial(ioi, single, "io"),
        "extra_s": build_adversarial(ioi, single, "s"),
        "extra_io_double": build_adversarial(ioi, double, "io"),
        "extra_s_double": build_adversarial(ioi, double, "s"),
    }
    results = adversarial_metrics(model, ioi, built, ctx.memory_budget_mb)
    frames = []
    clean_texts = ioi.prompts_without_answer
    for variant in VARIANTS:
        values = results[variant]
        parts = built.get(variant)
        sentences = single if variant in ("extra_io", "extra_s") else double
        frames.append(pd.DataFrame({
            "prompt": np.arange(n), "template": ioi.template_ids, "variant": variant,
            "sentence": ["" if parts is None else "".join(x) for x in sentences],
            "text": clean_texts if parts is None else parts["texts"],
            "end": (ioi.word_idx["END"] if parts is None else parts["end"]).numpy(),
            "insert_at": -1 if parts is None else parts["insert_at"].numpy(),
            "n_inserted": 0 if parts is None else parts["n_inserted"].numpy(),
            "logit_diff": values["logit_diff"], "io_prob": values["io_prob"],
            "s_over_io": values["s_over_io"],
        }))
    summary: dict[str, Any] = {v: _variant_summary(results[v], ctx.seed) for v in VARIANTS}
    fig8_keys = FIG8_KEYS[FIG8_VARIANT]
    summary.update({
        "fig8_variant": FIG8_VARIANT,
        "fig8_variant_note": "Fig. 8 is compared with the two-sentence variant, the paper code's "
                             "final call (advex.py, DOUBLE_ADX_TEMPLATE); the one-sentence variant "
                             "(the paper's App. L example) is in extra_io / extra_s",
        "fig8_extra_io": {**summary[fig8_keys["extra_io"]], "variant": FIG8_VARIANT},
        "fig8_extra_s": {**summary[fig8_keys["extra_s"]], "variant": FIG8_VARIANT},
        "fig8_extra_io_minus_clean_logit_diff": finite(
            results[fig8_keys["extra_io"]]["logit_diff"].mean() - results["clean"]["logit_diff"].mean()),
        "variant": "single",
        "extra_io_minus_clean_logit_diff": finite(results["extra_io"]["logit_diff"].mean()
                                                  - results["clean"]["logit_diff"].mean()),
        "extra_s_minus_clean_logit_diff": finite(results["extra_s"]["logit_diff"].mean()
                                                 - results["clean"]["logit_diff"].mean()),
        "example": {v: (clean_texts[0] if v == "clean" else built[v]["texts"][0]) for v in VARIANTS},
        "sentences": list(ADVERSARIAL_SENTENCES),
        "paper_reference": {**{k: dict(v) for k, v in PAPER_FIG8.items()}, "source": PAPER_FIG8_SOURCE},
    })
    meta = {
        "fig8_variant": f"{FIG8_VARIANT} (paper code's final call, DOUBLE_ADX_TEMPLATE): keys "
                        "fig8_extra_io / fig8_extra_s",
        "variant": "single",
        "extra_variant": "double (two sentences naming the same name, as the paper code's "
                         "DOUBLE_ADX_TEMPLATE) in keys extra_io_double / extra_s_double",
        "insertion": "after the last '.' before S2, else the last ',' before S2 (the first clause's "
                     "terminator, paper code word_idx['punct']); token sequences built by splicing "
                     "the tokenised sentence; END and S2 shifted by its length; IO/S labels unchanged",
        "sentence_choice": "seeded numpy Generator; the same sentence(s) for a prompt's IO and S "
                           "versions",
    }
    return ExperimentResult(pd.concat(frames, ignore_index=True), summary, meta)

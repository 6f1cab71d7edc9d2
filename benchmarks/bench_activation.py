"""Benchmark: ``ioi.patching`` activation patching vs ``transformer_lens.patching``.

For one model and batch, times TransformerLens's ``get_act_patch_attn_head_out_all_pos``,
``get_act_patch_attn_head_all_pos_every`` and ``get_act_patch_resid_pre`` against ours (same
metric, same clean cache), and reports the speedup and the largest absolute difference.

TransformerLens runs one full forward per patch, so its cost per patch does not depend on which
patch it is. With ``reference_patches=k`` (the default for big runs) the reference is timed on
``k`` patches spread evenly over the sweep (through ``transformer_lens.patching.
generic_activation_patch`` with an ``index_df``, i.e. TL's own loop) and its full-sweep time is
extrapolated as ``seconds_per_patch * total_patches``; the row says so
(``reference_patches_timed`` < ``reference_patches_total``, ``reference_extrapolated``) and
``max_abs_diff`` is taken over the timed cells. ``reference_patches=None`` times the full sweep.

Usage::

    python benchmarks/bench_activation.py --n 20            # random-gpt2-small, 20 prompts
    python benchmarks/bench_activation.py --n 100 --reference-patches 24 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

import ioi.patching as fast
from ioi.metrics import LogitDiff

# experiment -> (our function, [(TL activation name, TL patch setter name, TL axis names), ...])
_EXPERIMENTS: dict[str, tuple[Callable, list[tuple[str, str, tuple[str, ...]]]]] = {
    "attn_head_out_all_pos": (
        fast.get_act_patch_attn_head_out_all_pos,
        [("z", "layer_head_vector_patch_setter", ("layer", "head"))],
    ),
    "attn_head_all_pos_every": (
        fast.get_act_patch_attn_head_all_pos_every,
        [("z", "layer_head_vector_patch_setter", ("layer", "head")),
         ("q", "layer_head_vector_patch_setter", ("layer", "head")),
         ("k", "layer_head_vector_patch_setter", ("layer", "head")),
         ("v", "layer_head_vector_patch_setter", ("layer", "head")),
         ("pattern", "layer_head_pattern_patch_setter", ("layer", "head_index"))],
    ),
    "resid_pre": (
        fast.get_act_patch_resid_pre,
        [("resid_pre", "layer_pos_patch_setter", ("layer", "pos"))],
    ),
}


def _axis_sizes(model, tokens: torch.Tensor, axes: Sequence[str]) -> tuple[int, ...]:
    sizes = {"layer": model.cfg.n_layers, "head": model.cfg.n_heads, "head_index": model.cfg.n_heads,
             "pos": tokens.shape[1]}
    return tuple(sizes[a] for a in axes)


class _Clock:
    """Wall-clock and process-CPU seconds of a block (CPU time is less sensitive to other load)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _reference_cells(model, tokens, parts, n_patches: int | None) -> list[tuple[int, tuple[int, ...]]]:
    """(part, index) of the TL patches to time: all, or ``n_patches`` spread evenly over the sweep."""
    total = sum(int(np.prod(_axis_sizes(model, tokens, axes))) for _, _, axes in parts)
    cells = []
    for part, (_, _, axes) in enumerate(parts):
        shape = _axis_sizes(model, tokens, axes)
        size = int(np.prod(shape))
        if n_patches is None:
            flat = np.arange(size)
        else:
            k = max(1, round(n_patches * size / total))
            flat = np.unique(np.linspace(0, size - 1, min(k, size)).round().astype(int))
        cells += [(part, tuple(int(i) for i in np.unravel_index(f, shape))) for f in flat]
    return cells


def _time_reference(model, tokens, clean_cache, metric, parts, cells) -> tuple[list[float], float, float]:
    """Run TL's loop (``generic_activation_patch`` with an ``index_df``) on ``cells``."""
    from transformer_lens import patching as tl

    values: list[float] = []
    wall = cpu = 0.0
    for part, (act, setter, axes) in enumerate(parts):
        index = [idx for p, idx in cells if p == part]
        if not index:
            continue
        with _Clock() as clock, torch.no_grad():
            out = tl.generic_activation_patch(
                model, tokens, clean_cache, metric, patch_setter=getattr(tl, setter),
                activation_name=act, index_df=pd.DataFrame(index, columns=list(axes)),
            )
        wall += clock.wall
        cpu += clock.cpu
        values += out.tolist()
    return values, wall, cpu


def run(
    model,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor,
    metric: Any,
    *,
    device: str | torch.device | None = None,
    reference_patches: int | None = None,
    experiments: Sequence[str] = tuple(_EXPERIMENTS),
    fast_kwargs: dict | None = None,
) -> list[dict]:
    """Time TL vs ours for each experiment; one result row per experiment.

    ``reference_patches``: time TL on this many patches per experiment, spread evenly over the
    sweep, and extrapolate its cost per patch to the whole sweep (None: time the full sweep). Half
    of the timed TL patches run before our sweep and half after, so that a change in machine load
    affects both sides alike. The fast side always runs its full sweep (``verify`` forward
    included). Seconds are wall-clock; ``*_cpu`` fields give process CPU seconds as well.
    """
    device = str(device if device is not None else model.cfg.device)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens)
    rows = []
    for name in experiments:
        fn, parts = _EXPERIMENTS[name]
        fn(model, corrupted_tokens[:2], clean_cache=None, patching_metric=metric[:2],
           clean_tokens=clean_tokens[:2], progress=False)  # warm-up
        cells = _reference_cells(model, corrupted_tokens, parts, reference_patches)
        total = sum(int(np.prod(_axis_sizes(model, corrupted_tokens, axes))) for _, _, axes in parts)
        first, second = cells[0::2], cells[1::2]
        ref_a, wall_a, cpu_a = _time_reference(model, corrupted_tokens, clean_cache, metric, parts, first)
        with _Clock() as clock:
            ours = fn(model, corrupted_tokens, clean_cache, metric, progress=False, **(fast_kwargs or {}))
        ref_b, wall_b, cpu_b = _time_reference(model, corrupted_tokens, clean_cache, metric, parts, second)
        timed = [(cell, value) for cells_, values in ((first, ref_a), (second, ref_b))
                 for cell, value in zip(sorted(cells_, key=lambda c: c[0]), values)]
        stacked = len(parts) > 1
        diffs = [abs((ours[(part, *idx)] if stacked else ours[idx]).item() - value)
                 for (part, idx), value in timed]
        seconds_ref = (wall_a + wall_b) / len(cells) * total
        cpu_ref = (cpu_a + cpu_b) / len(cells) * total
        rows.append({
            "experiment": name,
            "seconds_reference": round(seconds_ref, 2),
            "seconds_fast": round(clock.wall, 2),
            "speedup": round(seconds_ref / clock.wall, 2),
            "max_abs_diff": max(diffs),
            "device": device,
            "reference_patches_timed": len(cells),
            "reference_patches_total": total,
            "reference_extrapolated": len(cells) < total,
            "reference_seconds_per_patch": round((wall_a + wall_b) / len(cells), 4),
            "cpu_seconds_reference": round(cpu_ref, 2),
            "cpu_seconds_fast": round(clock.cpu, 2),
            "speedup_cpu_time": round(cpu_ref / clock.cpu, 2),
            "n_prompts": int(corrupted_tokens.shape[0]),
            "seq_len": int(corrupted_tokens.shape[1]),
            "torch_threads": torch.get_num_threads(),
        })
    return rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def ioi_like_batch(n: int, seed: int = 0, prepend_bos: bool = False):
    """(clean, corrupted (p_ABC), LogitDiff, description) from :class:`ioi.data.IOIDataset`
    ("mixed" templates, prompts of different lengths, right-padded)."""
    from ioi.data import IOIDataset

    ds = IOIDataset("mixed", N=n, seed=seed, prepend_bos=prepend_bos)
    abc = ds.abc_dataset(seed=seed + 1)
    metric = LogitDiff(ds.word_idx["END"], ds.io_token_ids, ds.s_token_ids)
    return ds.toks, abc.toks, metric, "ioi.data.IOIDataset(mixed) + abc_dataset"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-gpt2-small")
    parser.add_argument("--n", type=int, default=100, help="number of prompts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference-patches", type=int, default=24,
                        help="TL patches timed per experiment (extrapolated); 0 = full sweep")
    parser.add_argument("--experiments", nargs="*", default=list(_EXPERIMENTS))
    parser.add_argument("--bos", action="store_true", help="prepend BOS")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    from ioi.models import load_model

    torch.set_grad_enabled(False)
    model = load_model(args.model, device=args.device)
    clean, corrupted, metric, source = ioi_like_batch(args.n, prepend_bos=args.bos)
    clean, corrupted = clean.to(args.device), corrupted.to(args.device)
    rows = run(model, clean, corrupted, metric, device=args.device,
               reference_patches=args.reference_patches or None, experiments=args.experiments)
    meta = {"model": args.model, "prompts": source, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    for row in rows:
        row.update(model=args.model)
    table = pd.DataFrame(rows)[["experiment", "seconds_reference", "seconds_fast", "speedup", "speedup_cpu_time",
                                "max_abs_diff", "reference_patches_timed", "reference_patches_total",
                                "n_prompts", "seq_len", "device"]]
    print(table.to_string(index=False))
    print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()

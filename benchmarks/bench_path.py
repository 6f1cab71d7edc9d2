"""Benchmark: seed-style reference path patching vs the fast implementation.

``run(model, orig_toks, new_toks, metric, word_idx, device=...)`` times, for each experiment, the
hook-based reference (:mod:`ioi.patching.reference`, the seed notebook's loops) and the fast
implementation (:mod:`ioi.patching.path`) and reports their largest absolute difference:

* ``logits_all_positions``: every head -> logits, senders patched at every position;
* ``logits_end``: every head -> logits, senders patched at END (paper Fig. 3b);
* ``nm_queries_q_end``: every head -> name-mover queries (9.9, 9.6, 10.0) at END (Fig. 4b);
* ``sinh_values_v_s2``: every head -> S-inhibition values (7.3, 7.9, 8.6, 8.10) at S2 (Fig. 5b).

The reference costs one or two full forward passes per sender, so on CPU it can be timed on a
subset of senders (``reference_senders``): its per-sender cost is then measured on that subset
(each sender's loop iteration timed) and extrapolated to all senders, plus its measured caching
runs (step 1); such rows carry ``reference_senders_timed < reference_senders_total`` and
``reference_extrapolated: true``, and ``max_abs_diff`` covers the timed senders only. Half the
timed senders run before and half after the fast runs, so a drift in the machine's speed (shared
hosts) affects both sides alike.

Two comparisons per row: end to end (``seconds_reference`` vs ``seconds_fast``: each side runs its
own forward passes on ``x_orig`` and ``x_new``) and sweep only (``*_sweep``: both sides given those
runs, as the seed notebook's functions are given ``orig_cache``/``new_cache``; the fast side via
``prepare_path_patching``).

Command line (GPT-2 small's shape with random weights, IOI prompts and their p_ABC corruption)::

    python benchmarks/bench_path.py --n 100 --reference-senders 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from ioi.patching.path import path_patch_to_heads, path_patch_to_logits, prepare_path_patching
from ioi.patching.reference import ref_path_patch_to_heads, ref_path_patch_to_logits

NAME_MOVERS = [(9, 9), (9, 6), (10, 0)]
S_INHIBITION = [(7, 3), (7, 9), (8, 6), (8, 10)]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _spread(senders: list, k: int | None) -> list:
    """``k`` senders spread evenly over the list (all when ``k`` is None or large)."""
    if k is None or k >= len(senders):
        return list(senders)
    k = max(1, k)
    idx = torch.linspace(0, len(senders) - 1, k).round().long().unique().tolist()
    return [senders[i] for i in idx]


def _receivers_for(model, wanted: list[tuple[int, int]], fallback_layers: tuple[int, int]):
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if all(0 <= l < L and 0 <= h < H for l, h in wanted):
        return wanted
    lo, hi = (max(1, L + fallback_layers[0]), max(1, L + fallback_layers[1]))
    return sorted({(min(lo, L - 1), 0), (min(hi, L - 1), min(1, H - 1))})


@torch.no_grad()
def run(
    model,
    orig_toks: torch.Tensor,
    new_toks: torch.Tensor,
    metric,
    word_idx: dict,
    *,
    device: str | torch.device,
    reference_senders: int | None = 3,
    experiments: tuple[str, ...] = ("logits_all_positions", "logits_end", "nm_queries_q_end", "sinh_values_v_s2"),
    progress: bool = False,
) -> list[dict]:
    """Time reference vs fast path patching; one row per experiment (see module docstring)."""
    device = torch.device(device)
    orig_toks, new_toks = orig_toks.to(device), new_toks.to(device)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    end, s2 = word_idx["END"].to(device), word_idx["S2"].to(device)
    nm = _receivers_for(model, NAME_MOVERS, (-3, -2))
    sinh = _receivers_for(model, S_INHIBITION, (-5, -4))
    specs = {
        "logits_all_positions": dict(kind="logits", kw=dict(sender_positions=None)),
        "logits_end": dict(kind="logits", kw=dict(sender_positions=end)),
        "nm_queries_q_end": dict(
            kind="heads", receivers=nm, which="q", kw=dict(sender_positions=end, receiver_positions=end)
        ),
        "sinh_values_v_s2": dict(
            kind="heads", receivers=sinh, which="v", kw=dict(sender_positions=s2, receiver_positions=s2)
        ),
    }
    # The fast implementation's two forward passes, shared by the "sweep only" timings.
    cache, t_prepare = _timed(lambda: prepare_path_patching(model, orig_toks, new_toks), device)
    rows = []
    for name in experiments:
        spec = specs[name]
        if spec["kind"] == "logits":
            all_senders = [(l, h) for l in range(L) for h in range(H)]
            fast_fn = lambda cache=None: path_patch_to_logits(  # noqa: E731
                model, orig_toks, new_toks, metric, progress=progress, cache=cache, **spec["kw"]
            )
            subset = _spread(all_senders, reference_senders)
            ref_fn = lambda timings, subset: ref_path_patch_to_logits(  # noqa: E731
                model, orig_toks, new_toks, metric, sender_subset=subset, progress=progress,
                timings=timings, **spec["kw"],
            )
        else:
            top = max(l for l, _ in spec["receivers"])
            all_senders = [(l, h) for l in range(top) for h in range(H)]
            fast_fn = lambda cache=None: path_patch_to_heads(  # noqa: E731
                model, orig_toks, new_toks, metric, spec["receivers"], spec["which"], progress=progress,
                cache=cache, **spec["kw"],
            )
            subset = _spread(all_senders, reference_senders)
            ref_fn = lambda timings, subset: ref_path_patch_to_heads(  # noqa: E731
                model, orig_toks, new_toks, metric, spec["receivers"], spec["which"],
                sender_subset=subset, progress=progress, timings=timings, **spec["kw"],
            )
        # The reference is timed on half its senders before and half after the fast runs, so a
        # drift in the machine's speed (shared hosts) affects both sides alike.
        first, second = subset[0::2], subset[1::2]
        timings_a: dict = {}
        ref_a, t_ref_a = _timed(lambda: ref_fn(timings_a, first), device)
        fast, t_fast = _timed(fast_fn, device)
        fast_cached, t_fast_sweep = _timed(lambda: fast_fn(cache), device)
        timings_b: dict = {"setup_seconds": 0.0, "sender_seconds": []}
        if second:
            timings_b = {}
            ref_b, t_ref_b = _timed(lambda: ref_fn(timings_b, second), device)
            ref = torch.where(ref_a.isnan(), ref_b, ref_a)
        else:
            ref, t_ref_b = ref_a, 0.0
        t_ref_subset = t_ref_a + t_ref_b
        timings = {"sender_seconds": timings_a["sender_seconds"] + timings_b["sender_seconds"]}
        runs = 2 if second else 1
        t_setup = (timings_a["setup_seconds"] + timings_b["setup_seconds"]) / runs
        idx_l = torch.tensor([l for l, _ in subset])
        idx_h = torch.tensor([h for _, h in subset])
        diff = (fast[idx_l, idx_h] - ref[idx_l, idx_h]).abs().max().item()
        diff_cached = (fast_cached - fast).nan_to_num().abs().max().item()
        per_sender = sum(timings["sender_seconds"]) / len(subset)
        extrapolated = len(subset) < len(all_senders)
        t_ref = t_setup + per_sender * len(all_senders) if extrapolated else t_setup + sum(timings["sender_seconds"])
        row = {
            "experiment": name,
            "seconds_reference": round(t_ref, 3),
            "seconds_fast": round(t_fast, 3),
            "speedup": round(t_ref / t_fast, 1),
            "max_abs_diff": diff,
            "device": str(device),
            "n_prompts": int(orig_toks.shape[0]),
            "seq_len": int(orig_toks.shape[1]),
            "reference_senders_timed": len(subset),
            "reference_senders_total": len(all_senders),
            "reference_extrapolated": extrapolated,
            "reference_seconds_timed": round(t_ref_subset, 3),
            "reference_setup_seconds": round(t_setup, 3),
            "reference_seconds_per_sender": round(per_sender, 3),
            # Sweep only: both sides given their x_orig / x_new caches (as the seed's functions are).
            "seconds_reference_sweep": round(per_sender * len(all_senders), 3),
            "seconds_fast_sweep": round(t_fast_sweep, 3),
            "speedup_sweep": round(per_sender * len(all_senders) / t_fast_sweep, 1),
            "fast_prepare_seconds": round(t_prepare, 3),
            "max_abs_diff_cached_vs_uncached": diff_cached,
        }
        if spec["kind"] == "heads":
            row["receivers"] = [list(r) for r in spec["receivers"]]
            row["receiver_input"] = spec["which"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _dataset(n: int, seed: int):
    """N IOI prompts (the paper code's "mixed" templates) and their position-aligned p_ABC."""
    from ioi.data import IOIDataset

    ds = IOIDataset("mixed", N=n, seed=seed)
    abc = ds.abc_dataset()
    word_idx = {k: ds.word_idx[k] for k in ("IO", "S1", "S1+1", "S2", "END")}
    return ds.toks, abc.toks, word_idx, ds.io_token_ids, ds.s_token_ids, "ioi.data.IOIDataset(mixed) + abc_dataset()"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-gpt2-small")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--reference-senders", type=int, default=3,
        help="senders the reference is timed on per experiment (0 = all; else extrapolated)",
    )
    parser.add_argument("--experiments", nargs="*", default=None)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's own, = the core count); on a busy machine "
        "1 thread can be faster for both sides",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    from ioi.metrics import LogitDiff
    from ioi.models import load_model

    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    toks, new, word_idx, io, s, source = _dataset(args.n, args.seed)
    metric = LogitDiff(word_idx["END"].to(args.device), io.to(args.device), s.to(args.device))
    kwargs = {}
    if args.experiments:
        kwargs["experiments"] = tuple(args.experiments)
    rows = run(
        model, toks, new, metric, word_idx, device=args.device,
        reference_senders=None if args.reference_senders == 0 else args.reference_senders, **kwargs,
    )
    meta = {
        "model": args.model, "n": args.n, "seed": args.seed, "data": source,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    header = (f"{'experiment':<22}{'ref s':>9}{'fast s':>8}{'speedup':>8}{'ref sweep':>10}{'fast sweep':>11}"
              f"{'speedup':>8}{'max|diff|':>10}  ref senders")
    print(header)
    print("-" * len(header))
    for r in rows:
        note = f"{r['reference_senders_timed']}/{r['reference_senders_total']}" + (" (extrapolated)" if r["reference_extrapolated"] else "")
        print(f"{r['experiment']:<22}{r['seconds_reference']:>9.1f}{r['seconds_fast']:>8.1f}{r['speedup']:>8.1f}"
              f"{r['seconds_reference_sweep']:>10.1f}{r['seconds_fast_sweep']:>11.1f}{r['speedup_sweep']:>8.1f}"
              f"{r['max_abs_diff']:>10.1e}  {note}")
    out = {"meta": meta, "rows": rows}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()

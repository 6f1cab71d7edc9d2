"""Copy-score kernels: the dense reference (every chunk's full logits, then the rank test) vs the
bounded one (the default; ``ioi.analysis.copy_scores.copy_score_hits``), on the paper's samples
(IO, S1, S2 of N prompts), back to back, with their per-sample hits compared.

Prints wall and CPU seconds per head of each kernel, their ratio and whether the hits are
identical; ``--json FILE`` writes them. Timings only (random weights: the copy scores themselves
mean nothing). Full scale (GPT-2-shaped checkpoint, N = 1000, every head, about 5 CPU minutes):

    python benchmarks/copy_scores.py --model-path <checkpoint> --n 1000 --json benchmarks/measured/copy_scores_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="random-gpt2-small", help="checkpoint folder or model spec")
    parser.add_argument("--n", type=int, default=1000, help="prompts (3N samples)")
    parser.add_argument("--heads", type=int, default=0, help="score only the first H heads (0: every head)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from ioi.analysis.copy_scores import copy_score_hits, paper_copy_inputs
    from ioi.data import IOIDataset
    from ioi.pipeline import load_workflow_model
    from ioi.provenance import git_commit

    torch.set_num_threads(args.threads)
    model = load_workflow_model(args.model_path, device="cpu", seed=0)
    dataset = IOIDataset(N=args.n, seed=0, tokenizer=model.tokenizer)
    positions = {key: dataset.word_idx[key] for key in ("IO", "S1", "S2")}
    resid, names = paper_copy_inputs(model, dataset.toks, positions)
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    heads = heads[:args.heads] if args.heads else heads
    timings, hits = {}, {}
    for method in ("dense", "bounded"):
        wall, cpu = time.perf_counter(), time.process_time()
        hits[method] = copy_score_hits(model, resid, names, heads=heads, method=method)
        timings[method] = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}
    identical = all(torch.equal(hits["dense"][s], hits["bounded"][s]) for s in (False, True))
    report = {"heads": len(heads), "samples": int(names.shape[0]), "threads": args.threads, **timings,
              "ratio_wall": round(timings["dense"]["wall_s"] / timings["bounded"]["wall_s"], 2),
              "ratio_cpu": round(timings["dense"]["cpu_s"] / timings["bounded"]["cpu_s"], 2),
              "identical_hits": identical, "git_commit": git_commit(REPO)}
    for method in ("dense", "bounded"):
        t = timings[method]
        print(f"{method:8s} {t['wall_s']:8.2f} s wall {t['cpu_s']:8.2f} s CPU  "
              f"{t['cpu_s'] / len(heads):.3f} s CPU per head")
    print(f"{len(heads)} heads x {report['samples']} samples, {args.threads} thread(s): bounded is "
          f"{report['ratio_wall']}x faster by wall, {report['ratio_cpu']}x by CPU; hits "
          f"{'identical' if identical else 'DIFFER'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

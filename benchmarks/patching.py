"""Patching benchmark: every experiment both ways (reference vs ioi.patching), one table + JSON.

Runs on the GPT-2-small-shaped random model (same cost as GPT-2 small) with N IOI prompts (default
100, the paper's N) and their p_ABC: activation patching against ``transformer_lens.patching``
(benchmarks/bench_activation.py) and path patching against the seed-notebook-style loop
(benchmarks/bench_path.py). Reports seconds each way, speedup, max |difference| and the device.

Where a full reference sweep is too slow on a CPU, the reference is timed on a subset of patches or
senders spread over the sweep and extrapolated per patch; those rows say so in their
``reference_*_timed`` fields. The same script runs unchanged on CUDA (``--device cuda``).

    python benchmarks/patching.py                 # N=100, CPU
    python benchmarks/patching.py --n 25 --json results/benchmarks/patching.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_activation  # noqa: E402
import bench_path  # noqa: E402

from ioi.data import IOIDataset  # noqa: E402
from ioi.metrics import LogitDiff  # noqa: E402
from ioi.models import load_model  # noqa: E402
from ioi.provenance import device_description, write_json  # noqa: E402


def _table(rows: list[dict]) -> str:
    header = f"{'experiment':<34} {'reference s':>12} {'fast s':>9} {'speedup':>9} {'max |diff|':>11}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['experiment']:<34} {row['seconds_reference']:>12.2f} {row['seconds_fast']:>9.2f} "
            f"{row['speedup']:>8.1f}x {row['max_abs_diff']:>11.2e}"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-gpt2-small")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference-patches", type=int, default=24,
                        help="activation patches the TL reference is timed on (0 = full sweep)")
    parser.add_argument("--reference-senders", type=int, default=3,
                        help="senders the path-patching reference is timed on (0 = all)")
    parser.add_argument("--only", choices=("activation", "path"), default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    model = load_model(args.model, device=args.device, seed=args.seed)
    ioi = IOIDataset(N=args.n, seed=args.seed)
    abc = ioi.abc_dataset()
    device = torch.device(args.device)
    rows: list[dict] = []
    # The raw mean logit difference (logit units), so max |diff| is on the fp32 scale the 1e-4
    # tolerance is stated in. A normalised metric divides by the clean (or clean - corrupted) LD,
    # which is near zero on a random model and would inflate rounding differences arbitrarily.
    metric = LogitDiff.from_dataset(ioi)
    if args.only in (None, "activation"):
        rows += bench_activation.run(model, ioi.toks, abc.toks, metric, device=device,
                                     reference_patches=args.reference_patches or None)
    if args.only in (None, "path"):
        rows += bench_path.run(model, ioi.toks, abc.toks, metric, ioi.word_idx, device=device,
                               reference_senders=args.reference_senders or None)
    print(f"model {args.model}, N={args.n}, device {device_description(device)}")
    print(_table(rows))
    print(json.dumps(rows, indent=2, default=str))
    if args.json:
        write_json(args.json, {"model": args.model, "N": args.n, "device": device_description(device),
                               "rows": rows})
    return rows


if __name__ == "__main__":
    main()

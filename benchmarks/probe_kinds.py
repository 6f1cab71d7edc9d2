"""The two matmul probe kinds of ``benchmarks/_throughput.py`` side by side, alternated.

``engine``: T threads at once, each one ``[1024, d_model] x [d_model, d_mlp]`` addmm loop on one
torch thread (how the engines run their passes); ``openmp``: the same product as one GEMM on T
torch threads, best of 5 (the knockout benchmark's end probe) and single. Prints each kind's
median and max over ``--rounds`` alternations (the numbers quoted in docs/benchmarks.md for the
faster-kind rule); ``--json`` writes them.

    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python benchmarks/probe_kinds.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _throughput import EngineShapedProbe, OpenMPProbe  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    engine = EngineShapedProbe(args.d_model, 4 * args.d_model, args.threads, cpu, rows=1024)
    openmp = OpenMPProbe(args.d_model, 4 * args.d_model, args.threads, cpu, rows=1024)
    series = {"engine": [], "openmp_best_of_5": [], "openmp_single": []}
    for _ in range(args.rounds):
        series["engine"].append(engine.probe())
        series["openmp_best_of_5"].append(max(openmp.probe() for _ in range(5)))
        series["openmp_single"].append(openmp.probe())
    engine.close()
    out = {name: {"median_gflops": statistics.median(v), "max_gflops": max(v), "series": v}
           for name, v in series.items()}
    for name, row in out.items():
        print(f"{name:<18} median {row['median_gflops']:7.1f}  max {row['max_gflops']:7.1f} GFLOP/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, **out}, indent=2))
    return out


if __name__ == "__main__":
    main()

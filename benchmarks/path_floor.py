"""Path patching to head inputs (Figs. 4b, 5b, 12b, 13b, App. D / §3.3 query paths): the FLOP
floor of each sweep against our wall and CPU time.

For each experiment the paper's senders (every head below the last receiver layer) are patched at
one position (END, S2 or S1+1) into the receivers' q / k / v at that position (x_new = p_ABC into
x_orig = p_IOI; the metric reads each prompt's END). The floor counts the matmul FLOPs the sweep
really needs, with every exact saving we know:

* the two caching runs: x_orig over every prompt's positions up to END (all layers), x_new up to
  the last receiver layer;
* step 2 (frozen heads, position-wise): one row per prompt (the sender position), the sender's
  ``dz @ W_O`` and the MLPs from the sender's layer to the last receiver layer, the receivers'
  input projections;
* step 3: nothing changes before the first receiver layer nor before the receiver position
  (causal attention), so each prompt's window ``[receiver position, END]`` from the first receiver
  layer on: there only the receivers' attention changes (``dz @ W_O`` of the receivers and a
  rank-``d_head`` MLP input per receiver, then ``W_out``); every later layer in full on the window
  (q/k/v, W_O, MLP) except the last one, which needs only END's query, END's attention (scores and
  mix against the LayerNorm-ed window rows, ``d_model`` per row and head) and END's MLP.

Attention over the prefix, LayerNorms, GELU and the two unembedding columns are not counted (not
matmul bound). The floor in seconds is the floor at the MLP shape's measured matmul throughput
(best of before/after the sweeps); ``ratio`` = our seconds / floor seconds, by wall and by this
process's CPU time (the CPU row is the one to read on a shared machine).

    python benchmarks/path_floor.py                          # N=100, GPT-2-small-shaped weights
    python benchmarks/path_floor.py --n 20 --only fig13b     # a small run
    python benchmarks/path_floor.py --json benchmarks/measured/path_floor_cpu_2threads.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from knockouts import matmul_gflops  # noqa: E402

from ioi.circuits import PAPER_CIRCUIT  # noqa: E402
from ioi.data import IOIDataset  # noqa: E402
from ioi.experiments.path_figures import FIG13B_PAPER_RECEIVERS, _class_heads  # noqa: E402
from ioi.metrics import LogitDiff  # noqa: E402
from ioi.models import load_model  # noqa: E402
from ioi.patching._fast_forward import net_weights  # noqa: E402
from ioi.patching.path import path_patch_to_heads  # noqa: E402
from ioi.provenance import device_description, provenance, write_json  # noqa: E402


def experiments(circuit) -> dict[str, tuple[list, str, str]]:
    """name -> (receivers, receiver input, position) as ioi.experiments.path_figures runs them."""
    nm, sinh = _class_heads(circuit, "name mover"), _class_heads(circuit, "s-inhibition")
    induction = list(FIG13B_PAPER_RECEIVERS)
    return {"fig4b": (nm, "q", "END"), "fig5b": (sinh, "v", "S2"), "fig12b": (sinh, "k", "S2"),
            "fig13b": (induction, "k", "S1+1"), "induction_queries": (induction, "q", "S2"),
            "sinh_queries": (sinh, "q", "END")}


def floor_flops(net, receivers, end: torch.Tensor, first: torch.Tensor) -> float:
    """Matmul FLOPs of one sweep (module docstring); ``first [N]``: each prompt's receiver position."""
    L, H, dh, D, F = net.n_layers, net.n_heads, net.d_head, net.d_model, net.d_mlp
    hd = H * dh
    dense = 2 * D * 3 * hd + 2 * hd * D + 4 * D * F  # one row through one layer
    max_lr, min_lr = max(l for l, _ in receivers), min(l for l, _ in receivers)
    n_rec = {l: sum(1 for rl, _ in receivers if rl == l) for l in range(L)}
    rows_upto_end = float((end + 1).sum())
    n = len(end)
    total = rows_upto_end * dense * L + rows_upto_end * dense * max_lr  # x_orig, x_new
    window = (end - first + 1).double()
    rows_w = float(window.sum())
    for sender_layer in range(max_lr):
        # step 2: one row per prompt; each of the layer's H senders
        per_row = 2 * dh * D + 4 * D * F * (max_lr - sender_layer) + 2 * D * dh * len(receivers)
        total += H * n * per_row
        # step 3 per sender
        s3 = 0.0
        for layer in range(min_lr, L):
            if layer == min_lr:
                r = n_rec[layer] * dh
                s3 += rows_w * (2 * r * D + 2 * r * F + 2 * F * D) if layer < L - 1 else \
                    n * (2 * r * D + 2 * r * F + 2 * F * D)
            elif layer < L - 1:
                s3 += rows_w * dense
            else:
                s3 += n * (2 * D * hd + 2 * hd * D + 2 * hd * D + 2 * hd * D + 4 * D * F) + rows_w * 4 * H * D
        total += H * s3
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="random-gpt2-small")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="comma-separated experiment names")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-budget-mb", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    model = load_model(args.spec, device=device, seed=0)
    ioi = IOIDataset(N=args.n, seed=args.seed, tokenizer=model.tokenizer)
    abc = ioi.abc_dataset()
    metric = LogitDiff.from_dataset(ioi, per_prompt=True)
    net = net_weights(model, device)
    cases = experiments(PAPER_CIRCUIT)
    names = list(cases) if args.only is None else args.only.split(",")
    before = matmul_gflops(net, device)
    timed = []
    for name in names:
        receivers, which, key = cases[name]
        pos = ioi.word_idx[key].to(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        path_patch_to_heads(model, ioi.toks.to(device), abc.toks.to(device), metric, receivers, which,
                            sender_positions=pos, receiver_positions=pos, progress=False,
                            memory_budget_mb=args.memory_budget_mb)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        flops = floor_flops(net, receivers, ioi.word_idx["END"].cpu(), ioi.word_idx[key].cpu())
        timed.append((name, receivers, which, key, flops, seconds, cpu_seconds))
    after = matmul_gflops(net, device)
    gflops, gflops_cpu = max(before[0], after[0]), max(before[1], after[1])
    rows = []
    for name, receivers, which, key, flops, seconds, cpu_seconds in timed:
        floor_s, floor_cpu_s = flops / (gflops * 1e9), flops / (gflops_cpu * 1e9)
        rows.append({"experiment": name, "receivers": [f"{l}.{h}" for l, h in receivers],
                     "receiver_input": which, "position": key, "floor_flops": flops,
                     "floor_seconds": floor_s, "seconds": seconds, "ratio": seconds / floor_s,
                     "floor_cpu_seconds": floor_cpu_s, "cpu_seconds": cpu_seconds,
                     "ratio_cpu": cpu_seconds / floor_cpu_s})
    out = {"spec": args.spec, "n": args.n, "device": device_description(device),
           "threads": torch.get_num_threads(), "matmul_gflops": gflops,
           "matmul_gflops_per_cpu_second": gflops_cpu, "rows": rows, "provenance": provenance()}
    header = (f"{'experiment':>18} {'input':>5} {'pos':>5} {'floor TFLOP':>11} {'floor s':>8} {'our s':>7} "
              f"{'ratio':>6} {'floor cpu s':>11} {'our cpu s':>9} {'ratio':>6}")
    print(f"{args.spec}, N={args.n}, {out['threads']} threads, {out['device']}; matmul {gflops:.1f} "
          f"GFLOPS per wall s, {gflops_cpu:.1f} per CPU s")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['experiment']:>18} {r['receiver_input']:>5} {r['position']:>5} {r['floor_flops'] / 1e12:>11.3f} "
              f"{r['floor_seconds']:>8.1f} {r['seconds']:>7.1f} {r['ratio']:>5.2f}x {r['floor_cpu_seconds']:>11.1f} "
              f"{r['cpu_seconds']:>9.1f} {r['ratio_cpu']:>5.2f}x")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

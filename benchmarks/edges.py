"""Edge-level benchmark (issue 12): EAP for every edge, circuit evaluation by exact edge patching
against the arithmetic floor, and ACDC on the planted model. Prints a table, writes JSON.

Rows
----
* ``eap_all_edges``: :func:`ioi.edges.eap_scores` for every edge of ``--model`` (default
  ``random-gpt2-small``: GPT-2 small's shape and cost, random weights), N IOI prompts vs p_ABC.
  Target: <= 60 s on 2 CPU cores at N=100.
* ``circuits_exact``: ``--circuits`` circuits evaluated by :func:`ioi.edges.patch_edges`
  (``mode="keep"``: circuit clean, every other edge patched) -- the top-n edges of the EAP scores
  for n log-spaced from 1 to every edge (a faithfulness curve); and the same number of random
  circuits (``--random-circuits``, default 20; each edge kept with probability 1/2: the densest
  case, every receiver's input distinct). Beside each the arithmetic
  floor: ``circuits x`` the FLOPs of one plain forward pass (every layer at every position up to
  each prompt's END, the full-vocabulary unembedding at END only: :func:`forward_flops`) divided by the machine's
  float32 matmul throughput on ``[2048, d_model] x [d_model, 4 d_model]``, *sampled during the
  row's run* (``benchmarks/_throughput.py``: every ``--probe-interval`` seconds, between two
  passes, two probes: as the engine runs them, ``T`` threads at once on one torch thread each, and
  one GEMM on ``T`` OpenMP threads; their seconds are taken out of ours): ``x floor`` is at the
  faster kind's median over those samples; the JSON also
  has the ratio at the fastest sample and at the one probe taken before the rows (one GEMM on
  ``T`` OpenMP threads, the rule before in-run sampling). Target: <= 1.5x the floor. ``--memory-budget-mb`` (default 2048, the workflow's
  ``memory_budget_mb``) is patch_edges' working memory. Also reported: the engine passes (sets x prompt chunks) and the
  stages (each layer's head inputs and MLP input, the logits) skipped by resuming each set from
  the previous set's pass (``stages_skipped``, ``fraction_stages_skipped``; nested top-n sets
  share their early layers, random sets almost nothing).
* ``acdc_planted``: :func:`ioi.edges.acdc` on ``planted-ioi`` at ``--acdc-n`` prompts (demo N),
  reporting the edges kept and whether the planted name-mover -> logits edge is among them.
  Target: <= 120 s on 2 CPU cores.

Timings are wall-clock seconds; they are never asserted in tests.

    python benchmarks/edges.py                                 # the issue's scale (N=100, 100 circuits)
    python benchmarks/edges.py --n 10 --circuits 4 --acdc-n 8  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ioi.data import IOIDataset
from ioi import planted as planted_model
from ioi.edges import EdgeGraph, acdc, eap_scores, patch_edges, top_n
from ioi.edges.scoring import circuit_confusion, roc_auc, truth_labels
from ioi.metrics import LogitDiff
from ioi.models import load_model
from ioi.edges._engine import EdgeForward
from ioi.edges.patching import _workers as _patch_workers
from ioi.provenance import device_description, provenance, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _throughput import OpenMPProbe, ThroughputSampler, probes_for  # noqa: E402

TARGETS = {"eap_all_edges": "<= 60 s", "circuits_exact": "<= 1.5x floor", "acdc_planted": "<= 120 s"}


def matmul_gflops(d_model: int, device: torch.device, repeats: int = 10) -> float:
    """Measured float32 matmul throughput (GFLOP/s) on a forward-pass-shaped product
    ``[2048, d_model] x [d_model, 4 d_model]``, as one GEMM on the torch threads
    (:class:`_throughput.OpenMPProbe`, ``repeats`` products): the probe before the rows."""
    return OpenMPProbe(d_model, 4 * d_model, torch.get_num_threads(), device, rows=2048, repeats=repeats).probe()


def forward_flops(cfg, end_idx: torch.Tensor) -> float:
    """FLOPs (matmuls only) of the cheapest plain forward pass that yields the metric: every layer
    at each prompt's positions 0..END (causal attention: later positions cannot matter; padding
    is not counted) and the full-vocabulary unembedding at the END row only (the logit difference
    reads nothing else). Attention scores and weighted values are counted over the full square
    (a causal kernel could halve them; at IOI lengths they are < 1% of the total)."""
    d, L, d_mlp, vocab = cfg.d_model, cfg.n_layers, cfg.d_mlp, cfg.d_vocab
    lengths = (end_idx.long() + 1).double()
    tokens = float(lengths.sum())
    per_token = L * (2 * 4 * d * d + (0 if getattr(cfg, "attn_only", False) else 2 * 2 * d * d_mlp))
    attention = float((lengths**2).sum()) * L * 2 * 2 * d  # scores and weighted values
    unembed = len(lengths) * 2 * d * vocab  # END rows only
    return tokens * per_token + attention + unembed


def log_sizes(n_edges: int, count: int) -> list[int]:
    """``count`` distinct circuit sizes from 1 to ``n_edges``, log-spaced (each at least one more
    than the last: :func:`ioi.edges.patch_edges` evaluates a repeated set only once, so repeats
    would not be timed)."""
    sizes: list[int] = []
    for k in range(count):
        target = round(n_edges ** (k / max(1, count - 1)))
        sizes.append(min(n_edges, max(target, sizes[-1] + 1 if sizes else 1)))
    return sizes


_CPU_SECONDS: list[float] = []


def _timed(fn):
    """``(fn(), wall seconds)``; the process CPU seconds go to ``_CPU_SECONDS`` (on a loaded
    machine with one thread they say more than the wall clock)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _CPU_SECONDS.append(time.process_time() - cpu)
    return out, time.perf_counter() - start


def _sampled(fn, probes: dict, interval_s: float):
    """``(fn(), wall seconds without the probes, the sampler's summary)``: ``fn`` timed with the
    matmul probe sampled between the engine's passes (:meth:`EdgeForward.run`) during it."""
    sampler = ThroughputSampler({name: p.probe for name, p in probes.items()}, interval_s)
    original = EdgeForward.run
    EdgeForward.run = sampler.gate(original)
    try:
        out, seconds = _timed(fn)
    finally:
        EdgeForward.run = original
    seconds -= sampler.probe_wall_s
    _CPU_SECONDS[-1] -= sampler.probe_cpu_s
    sampler.sample()  # one more after the run
    return out, seconds, sampler.summary()


def _floor_keys(flops: float, seconds: float, samples: dict, gflops_before: float) -> dict:
    """The floor at the in-run median probe (the target's), at the fastest sample, and at the
    probe taken before the rows."""
    floor = flops / (samples["median_gflops"] * 1e9)
    fastest = flops / (samples["max_gflops"] * 1e9)
    before = flops / (gflops_before * 1e9)
    return {"floor_flops": flops, "floor_seconds": floor, "ratio_to_floor": seconds / floor,
            "matmul_gflops": samples["median_gflops"], "probe_samples": samples,
            "floor_seconds_fastest_sample": fastest, "ratio_to_floor_fastest_sample": seconds / fastest,
            "matmul_gflops_before": gflops_before, "ratio_to_floor_before_probe": seconds / before}


def _resume_keys(stats: dict) -> dict:
    """The passes of a :func:`patch_edges` call and the stages (a layer's head inputs, its MLP
    input, the logits) that resuming from the previous set's pass skipped."""
    done = stats["stages_run"] + stats["stages_skipped"]
    return {"passes": stats["runs"], "stages_per_pass": stats["n_stages"], "stages_skipped": stats["stages_skipped"],
            "fraction_stages_skipped": stats["stages_skipped"] / done if done else 0.0}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-gpt2-small")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--circuits", type=int, default=100)
    parser.add_argument("--random-circuits", type=int, default=20,
                        help="random p=1/2 circuits (the densest case; 0 skips the row)")
    parser.add_argument("--acdc-n", type=int, default=100)
    parser.add_argument("--acdc-tau", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-budget-mb", type=float, default=2048,
                        help="patch_edges' working memory (default: config/config.yaml's memory_budget_mb, "
                             "what the workflow's edge_circuits passes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", nargs="*", default=(), choices=("eap", "circuits", "acdc"))
    parser.add_argument("--probe-interval", type=float, default=15.0,
                        help="seconds between the matmul probes sampled between passes during a circuits row")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    rows: list[dict] = []
    model = load_model(args.model, device=args.device, seed=args.seed)
    ioi = IOIDataset(N=args.n, seed=args.seed)
    abc = ioi.abc_dataset()
    metric = LogitDiff.from_dataset(ioi)
    graph = EdgeGraph.from_model(model)
    gflops = matmul_gflops(model.cfg.d_model, device)
    probes = probes_for(model.cfg.d_model, 4 * model.cfg.d_model, _patch_workers(device), device, rows=2048,
                        repeats=4)
    probe_text = "; ".join(f"{name}: {p.describe()}" for name, p in probes.items())

    scores = None
    if "eap" not in args.skip or "circuits" not in args.skip:
        scores, seconds = _timed(lambda: eap_scores(model, ioi.toks, abc.toks, metric, graph))
        rows.append({"experiment": "eap_all_edges", "model": args.model, "N": args.n, "edges": len(graph),
                     "seconds": seconds, "target": TARGETS["eap_all_edges"],
                     "max_abs_score": float(scores.abs().max())})
    if "circuits" not in args.skip:
        sizes = log_sizes(len(graph), args.circuits)
        circuits = [top_n(scores, graph, int(n)) for n in sizes]
        stats: dict = {}
        values, seconds, samples = _sampled(
            lambda: patch_edges(model, ioi.toks, abc.toks, circuits, metric, graph=graph, mode="keep",
                                stats=stats, memory_budget_mb=args.memory_budget_mb), probes, args.probe_interval)
        rows.append({"experiment": "circuits_exact", "circuits": "top-n of EAP (log-spaced n)", "model": args.model,
                     "N": args.n, "n_circuits": len(circuits), "edges": len(graph), "seconds": seconds,
                     **_floor_keys(args.circuits * forward_flops(model.cfg, metric.end_idx), seconds, samples, gflops),
                     "target": TARGETS["circuits_exact"], "memory_budget_mb": args.memory_budget_mb, "metric_first_last": [float(values[0]), float(values[-1])],
                     **_resume_keys(stats)})
    if "circuits" not in args.skip and args.random_circuits > 0:
        gen = torch.Generator().manual_seed(args.seed)
        random_sets = torch.rand(args.random_circuits, len(graph), generator=gen) < 0.5
        stats = {}
        _, seconds, samples = _sampled(
            lambda: patch_edges(model, ioi.toks, abc.toks, random_sets, metric, graph=graph, mode="keep",
                                stats=stats, memory_budget_mb=args.memory_budget_mb), probes, args.probe_interval)
        rows.append({"experiment": "circuits_exact", "circuits": "random (p=1/2)", "model": args.model,
                     "N": args.n, "n_circuits": args.random_circuits, "edges": len(graph), "seconds": seconds,
                     **_floor_keys(args.random_circuits * forward_flops(model.cfg, metric.end_idx), seconds, samples,
                                   gflops),
                     "target": TARGETS["circuits_exact"], "memory_budget_mb": args.memory_budget_mb,
                     **_resume_keys(stats)})
    if "acdc" not in args.skip:
        planted = load_model("planted-ioi", device=args.device)
        small = IOIDataset(N=args.acdc_n, seed=args.seed)
        small_abc = small.abc_dataset()
        planted_graph = EdgeGraph.from_model(planted)
        truth = planted_model.circuit_edges()
        small_metric = LogitDiff.from_dataset(small)
        planted_scores, seconds = _timed(lambda: eap_scores(planted, small.toks, small_abc.toks, small_metric,
                                                            planted_graph))
        rows.append({"experiment": "eap_planted", "model": "planted-ioi", "N": args.acdc_n,
                     "edges": len(planted_graph), "seconds": seconds, "target": "-",
                     "auc": roc_auc(planted_scores, truth_labels(planted_graph, truth))})
        circuit, seconds = _timed(lambda: acdc(planted, small.toks, small_abc.toks, small_metric,
                                               planted_graph, args.acdc_tau))
        confusion = circuit_confusion(circuit, planted_graph, truth)
        rows.append({"experiment": "acdc_planted", "model": "planted-ioi", "N": args.acdc_n, "tau": args.acdc_tau,
                     "edges": len(planted_graph), "edges_kept": len(circuit), "seconds": seconds,
                     "target": TARGETS["acdc_planted"], "kept": circuit.names,
                     "name_mover_to_logits_kept": "a3.h1->logits" in circuit.names,
                     "tested": circuit.meta["n_tested"], "batched_passes": circuit.meta["n_batched_passes"],
                     "planted_edges": len(truth), "true_positives": confusion["tp"],
                     "false_positives": confusion["fp"], "exact_planted_circuit": confusion["fp"] == 0
                     and confusion["fn"] == 0})

    for row, cpu in zip(rows, _CPU_SECONDS[-len(rows):]):
        row["cpu_seconds"] = cpu
    print(json.dumps(rows, indent=2, default=str))
    for p in probes.values():
        p.close()
    print(f"device {device_description(device)}, torch threads {torch.get_num_threads()}, "
          f"matmul {gflops:.1f} GFLOP/s before the rows (one GEMM on the torch threads)")
    for row in rows:
        if "probe_samples" in row:
            p = row["probe_samples"]
            print(f"  {row['experiment']} / {row['circuits']}: floor at the faster kind's median ({p['rate_probe']}) of "
                  f"{p['samples']} in-run samples ({probe_text}): {p['median_gflops']:.1f} GFLOP/s (range {p['min_gflops']:.0f}-"
                  f"{p['max_gflops']:.0f}; {p['probe_wall_s']:.1f} s of probes taken out of ours); x floor at the "
                  f"fastest sample {row['ratio_to_floor_fastest_sample']:.2f}, at the probe before the rows "
                  f"{row['ratio_to_floor_before_probe']:.2f}")
    header = (f"{'experiment':<16} {'circuits':<28} {'model':<18} {'N':>4} {'edges':>6} {'seconds':>8} {'cpu s':>6} {'floor s':>8} "
              f"{'x floor':>7} {'AUC':>6}  target / found")
    print(header)
    print("-" * len(header))
    for row in rows:
        floor = row.get("floor_seconds")
        floor_s = "-" if floor is None else f"{floor:.1f}"
        ratio = "-" if floor is None else f"{row['ratio_to_floor']:.2f}"
        auc = f"{row['auc']:.3f}" if "auc" in row else "-"
        found = ""
        if "fraction_stages_skipped" in row:
            found = (f"; resumed: {row['stages_skipped']} of {row['passes'] * row['stages_per_pass']} stages "
                     f"skipped ({100 * row['fraction_stages_skipped']:.0f}%, {row['passes']} passes)")
        if row["experiment"] == "acdc_planted":
            found = (f"; kept {row['edges_kept']} ({row['true_positives']}/{row['planted_edges']} planted, "
                     f"{row['false_positives']} extra)")
        print(f"{row['experiment']:<16} {row.get('circuits', '-'):<28} {row['model']:<18} {row['N']:>4} "
              f"{row['edges']:>6} {row['seconds']:>8.1f} {row['cpu_seconds']:>6.1f} {floor_s:>8} {ratio:>7} {auc:>6}  {row['target']}{found}")
    if args.json:
        write_json(args.json, {
            "provenance": provenance(model, N=args.n, seed=args.seed, device=device_description(device),
                                     threads=torch.get_num_threads(), dataset_hash=ioi.content_hash(),
                                     abc_dataset_hash=abc.content_hash(), matmul_gflops_before=gflops,
                                     probe=probe_text),
            "rows": rows,
        })
    return rows


if __name__ == "__main__":
    main()

"""Completeness benchmark: the FLOP floor of its knockout evaluations against our wall time.

Runs the ``completeness`` experiment (ioi.experiments.circuit_eval, paper Fig. 6: K = ∅, each
class, the random sets and the greedy search, for the full and the naive circuit) on a
GPT-2-small-shaped random model (GPT-2 small's cost; random weights, so these are timings, not
GPT-2 results) at the paper's settings by default: N = 100, 10 greedy runs x 10 iterations x 10
candidates (5 for the naive circuit).

The floor counts the matmul FLOPs the evaluations really need, with every exact saving:

* the shared runs: the means' run over p_ABC, the clean run and the all-ablated run (every head
  mean-ablated, MLPs intact; one per means tensor, which the full and the naive circuit share),
  each a forward over every prompt's positions up to END (the all-ablated one projects only the
  keys and values of the circuit's heads);
* F(C\\K): only rows where a head of C\\K is kept (a row where every head is ablated equals the
  all-ablated run), from the first layer where C\\K differs from the run it resumes from; q only at
  the kept (head, row) pairs, k/v of the kept heads at the recomputed rows, W_O at the kept pairs,
  the MLP at the recomputed rows (END rows only in the last layer);
* F(M\\K): each prompt's window from its first ablated position to END, from the first layer where
  it differs from the run it resumes from (K ∪ {v} from K at v's layer); every head's q (END only in
  the last layer), k and v at the window rows, W_O and the MLP at the window rows (END only last);
* the issue's count ("issue floor") for comparison: F(C\\K) recomputing every row up to END.

Attention scores, LayerNorms, GELU and the two unembedding columns are not counted (not matmul
bound). The floor in seconds is the floor FLOPs at the machine's matmul throughput, measured on the
MLP's own shape ([1024, d_model] x [d_model, d_mlp]). The throughput is *sampled during the run*
(``benchmarks/_throughput.py``): every ``--probe-interval`` seconds (default 15) two probes run
between two knockout passes -- as the engine runs its passes (``T`` threads at once, one torch
thread each) and as one GEMM on ``T`` OpenMP threads -- and their seconds are taken out of ours.
``ratio`` = our seconds / the floor at the faster kind's median over those samples (the issue's
target: <= 1.5); also printed: the ratio at the fastest single sample (the strictest floor), and,
as before in-run sampling, at the best of one ``T``-thread GEMM probe before and after the run,
by wall time and by this process's CPU time. On a shared host the
in-run median is the number to read: the host's throughput moved by 37% between the two ends of
one run at f24c130.

    python benchmarks/knockouts.py                          # paper settings (the lead's full run)
    python benchmarks/knockouts.py --n 20 --greedy-runs 1   # a small run
    python benchmarks/knockouts.py --json benchmarks/measured/knockouts_cpu_2threads.json
    python benchmarks/knockouts.py --threads 2 --parallel serial   # A/B: chunks on 2 OpenMP threads
    python benchmarks/knockouts.py --threads 2 --profile-workers   # + per-worker busy time per pass

``--parallel`` says how a pass uses T > 1 threads on a CPU: ``prompts`` (default: the prompts cut
into T parts, each part's pass on its own worker thread), ``chunks`` (a pass's chunks on T worker
threads) or ``serial`` (one chunk at a time on T OpenMP threads); see ioi.ablation_engine.

A CPU user who wants completeness in minutes sets fewer greedy runs (``--greedy-runs 2`` here,
``GREEDY_RUNS`` in ioi.experiments.circuit_eval for the workflow): the cost is linear in it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ioi import ablation_engine  # noqa: E402
from ioi.circuits import PAPER_CIRCUIT  # noqa: E402
from ioi.data import IOIDataset  # noqa: E402
from ioi.experiments import circuit_eval as ce  # noqa: E402
from ioi.experiments.core import RunContext  # noqa: E402
from ioi.models import load_model  # noqa: E402
from ioi.provenance import device_description, provenance, write_json  # noqa: E402

from _throughput import OpenMPProbe, ThroughputSampler, probes_for  # noqa: E402


PARALLEL_MODES = ("prompts", "chunks", "serial")
PARALLEL_NOTES = {"prompts": "parallel prompt parts", "chunks": "parallel chunks", "serial": "serial chunks"}


def matmul_gflops(net, device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """Best GFLOPS of the MLP's input projection on 1024 rows (fp32) as one GEMM on the torch
    threads (:class:`_throughput.OpenMPProbe`, 8 products a probe), over ``repeats`` probes: per
    wall second and per CPU second of this process (the latter is what a shared machine's other
    jobs do not distort). The rule before in-run sampling, taken before and after the run."""
    probe = OpenMPProbe(net.d_model, net.d_mlp, torch.get_num_threads(), device, rows=1024, repeats=8)
    wall, cpu = [], []
    for _ in range(repeats):
        start_cpu = time.process_time()
        wall.append(probe.probe())
        cpu.append(probe.flops / max(time.process_time() - start_cpu, 1e-9) / 1e9)
    return max(wall), max(cpu)


class Recorder:
    """Records every spec the engine evaluates (with the layer and base it resumes from)."""

    def __init__(self, sampler: ThroughputSampler | None = None):
        self.records: list[tuple] = []
        self.engines: list = []
        self._original = ablation_engine.KnockoutEngine.evaluate
        self._evaluate = self._original if sampler is None else sampler.gate(self._original)

    def __enter__(self):
        recorder = self

        def evaluate(engine, specs, *, bases=()):
            runs = recorder._evaluate(engine, specs, bases=bases)
            if not any(e is engine for e in recorder.engines):
                recorder.engines.append(engine)
            recorder.records += [(engine, spec, run.start) for spec, run in zip(specs, runs)]
            return runs

        ablation_engine.KnockoutEngine.evaluate = evaluate
        return self

    def __exit__(self, *exc):
        ablation_engine.KnockoutEngine.evaluate = self._original


class WorkerTimer:
    """Per pass of parallel prompt parts: each worker's wall and CPU time (``time.thread_time``)
    and the main thread's CPU time, to tell load imbalance (the slowest worker's CPU time above
    the mean), off-CPU waits in the workers (wall above CPU: the GIL, or other jobs on a shared
    machine) and the main thread's serial work (between passes and around them) apart."""

    def __init__(self):
        self.passes: list[dict] = []
        self._parts = ablation_engine.KnockoutEngine._evaluate_parts
        self._here = ablation_engine.KnockoutEngine._evaluate_here

    def __enter__(self):
        timer, lock = self, threading.Lock()

        def evaluate_parts(engine, specs, bases, parts):
            record = {"specs": len(specs), "workers": []}
            timer.passes.append(record)
            timer._current = record
            start, start_main = time.perf_counter(), time.thread_time()
            out = timer._parts(engine, specs, bases, parts)
            record["wall"], record["main_cpu"] = time.perf_counter() - start, time.thread_time() - start_main
            return out

        def evaluate_here(engine, specs, bases):
            if threading.current_thread() is threading.main_thread():
                return timer._here(engine, specs, bases)
            start, start_cpu = time.perf_counter(), time.thread_time()
            out = timer._here(engine, specs, bases)
            with lock:
                timer._current["workers"].append((time.perf_counter() - start, time.thread_time() - start_cpu))
            return out

        ablation_engine.KnockoutEngine._evaluate_parts = evaluate_parts
        ablation_engine.KnockoutEngine._evaluate_here = evaluate_here
        return self

    def __exit__(self, *exc):
        ablation_engine.KnockoutEngine._evaluate_parts = self._parts
        ablation_engine.KnockoutEngine._evaluate_here = self._here

    def summary(self, main_cpu_total: float, wall_total: float) -> dict:
        passes = [p for p in self.passes if p["workers"]]
        cpu_max = sum(max(c for _, c in p["workers"]) for p in passes)
        cpu_mean = sum(sum(c for _, c in p["workers"]) / len(p["workers"]) for p in passes)
        wall_mean = sum(sum(w for w, _ in p["workers"]) / len(p["workers"]) for p in passes)
        main_in = sum(p["main_cpu"] for p in passes)
        return {
            "parallel_passes": len(passes), "pass_wall_s": sum(p["wall"] for p in passes),
            "worker_cpu_max_s": cpu_max, "worker_cpu_mean_s": cpu_mean, "worker_wall_mean_s": wall_mean,
            "imbalance": cpu_max / cpu_mean if cpu_mean else None,  # slowest worker's CPU / the mean, summed over passes
            "worker_wall_over_cpu": wall_mean / cpu_mean if cpu_mean else None,  # off-CPU waits in the workers
            "main_cpu_in_passes_s": main_in, "main_cpu_between_passes_s": main_cpu_total - main_in,
            # wall time outside the parallel passes (the workers idle): the main thread's serial
            # work, its OpenMP regions (the shared runs) and its waits (e.g. for OpenMP threads)
            "wall_between_passes_s": wall_total - sum(p["wall"] for p in self.passes),
        }


def spec_floor(engine, spec, start: int, share_rows: bool = True) -> float:
    """Matmul FLOPs one spec needs (module doc), from ``start`` to the last layer."""
    net = engine.net
    L, D, H, dh, d_mlp = net.n_layers, net.d_model, net.n_heads, net.d_head, net.d_mlp
    if start >= L:
        return 0.0
    if spec.source == "ablated" and not share_rows:
        rows = engine.valid.clone()
    else:
        rows = engine.changed_rows(spec)
    n_rows = float(rows.sum())
    at_end = rows[torch.arange(engine.n, device=rows.device), engine.end]  # prompts whose END row is recomputed
    n_end = float(at_end.sum())
    flops = 0.0
    for layer in range(start, L):
        last = layer == L - 1
        mlp_rows = n_end if last else n_rows
        flops += 4.0 * mlp_rows * D * d_mlp
        if spec.source == "ablated":
            kept = spec.head_keep[:, :, layer] & rows[..., None]  # [N, S, H] kept (row, head) pairs
            if last:
                kept = kept & (torch.arange(engine.seq, device=engine.end.device)[None, :, None] == engine.end[:, None, None])
            heads = int(spec.head_keep[:, :, layer].any(0).any(0).sum())
            pairs = float(kept.sum())
            flops += 2.0 * D * dh * (pairs + 2 * heads * n_rows) + 2.0 * dh * D * pairs
        else:
            q_rows = n_end if last else n_rows
            flops += 2.0 * D * H * dh * (q_rows + 2 * n_rows) + 2.0 * H * dh * D * q_rows
    return flops


def stream_floor(engine, source: str, circuit_heads: int, means_run: bool = False) -> float:
    """A shared run over every prompt's rows up to END; in the last layer only END rows are read
    (``means_run``: the run over p_ABC for the means, which needs every head's z at every row and
    nothing after the last layer's z)."""
    net = engine.net
    rows, end_rows = float(engine.valid.sum()), float(engine.n)
    L, D, hd = net.n_layers, net.d_model, net.hd
    last_rows = 0.0 if means_run else end_rows  # rows whose MLP and W_O the last layer needs
    out_rows = rows * (L - 1) + last_rows
    flops = 4.0 * out_rows * D * net.d_mlp + 2.0 * out_rows * hd * D  # MLP, W_O (or the means' W_O)
    if source == "clean":
        q_rows = rows * L if means_run else rows * (L - 1) + end_rows
        flops += 2.0 * D * hd * (q_rows + 2 * rows * L)
    else:  # the all-ablated run: only keys and values of the circuit's heads are ever read from it
        flops += 2.0 * rows * D * 2 * net.d_head * circuit_heads
    return flops


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="random-gpt2-small")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy-runs", type=int, default=10)
    parser.add_argument("--greedy-iterations", type=int, default=10)
    parser.add_argument("--candidates-full", type=int, default=10)
    parser.add_argument("--candidates-naive", type=int, default=5)
    parser.add_argument("--random-sets", type=int, default=ce.N_RANDOM_SETS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-budget-mb", type=int, default=1024)
    parser.add_argument("--parallel", choices=PARALLEL_MODES, default="prompts",
                        help="how a pass uses T > 1 threads on a CPU: 'prompts' (default, the engine's "
                             "parallel_prompts=True: the prompts cut into T parts, one worker thread each), "
                             "'chunks' (parallel_chunks=True: a pass's chunks on T worker threads), 'serial' "
                             "(one chunk at a time on T torch threads)")
    parser.add_argument("--parallel-chunks", action="store_const", const="chunks", dest="parallel",
                        help="the same as --parallel chunks")
    parser.add_argument("--profile-workers", action="store_true",
                        help="also time each worker of every parallel pass (thread CPU and wall) and the main "
                             "thread: load imbalance, off-CPU waits and serial work (see WorkerTimer)")
    parser.add_argument("--probe-interval", type=float, default=15.0,
                        help="seconds between the matmul probes taken between passes during the run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ablation_engine.KnockoutEngine.PARALLEL_PROMPTS = args.parallel == "prompts"
    ablation_engine.KnockoutEngine.PARALLEL_CHUNKS = args.parallel == "chunks"
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    model = load_model(args.spec, device=device, seed=0)
    ioi = IOIDataset(N=args.n, seed=args.seed, tokenizer=model.tokenizer)
    abc = ioi.abc_dataset()
    circuit = PAPER_CIRCUIT
    ctx = RunContext(datasets={"ioi": ioi, "abc": abc}, circuit=circuit, seed=args.seed, n=args.n,
                     memory_budget_mb=args.memory_budget_mb, progress=False)
    counts = {"N_RANDOM_SETS": args.random_sets, "GREEDY_RUNS": args.greedy_runs,
              "GREEDY_ITERATIONS": args.greedy_iterations,
              "GREEDY_CANDIDATES": {"full": args.candidates_full, "naive": args.candidates_naive}}
    saved = {name: getattr(ce, name) for name in counts}
    net = ablation_engine.net_weights(model, device)
    gflops_before = matmul_gflops(net, device)
    probes = probes_for(net.d_model, net.d_mlp, torch.get_num_threads(), device, rows=1024, repeats=8)
    sampler = ThroughputSampler({name: p.probe for name, p in probes.items()}, args.probe_interval)
    try:
        for name, value in counts.items():
            setattr(ce, name, value)
        with Recorder(sampler) as recorder, (WorkerTimer() if args.profile_workers else contextlib.nullcontext()) as timer:
            start, start_cpu, start_main = time.perf_counter(), time.process_time(), time.thread_time()
            result = ce.completeness(model, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            main_cpu = time.thread_time() - start_main
    finally:
        for name, value in saved.items():
            setattr(ce, name, value)
    # the probes taken inside the timed run are not the engine's time
    seconds -= sampler.probe_wall_s
    cpu_seconds -= sampler.probe_cpu_s
    sampler.sample()  # one more at the end, outside the timed run
    in_run = sampler.summary()
    for p in probes.values():
        p.close()
    gflops_after = matmul_gflops(net, device)
    gflops = max(gflops_before[0], gflops_after[0])
    gflops_cpu = max(gflops_before[1], gflops_after[1])
    # floor: the shared runs once per dataset/means, plus every evaluated spec
    n_heads_circuit = len(circuit.heads())
    floor = issue_floor = 0.0
    first = recorder.engines[0]
    for means_run in (False, True):  # the clean run and the means' run over p_ABC (a forward pass each)
        floor += stream_floor(first, "clean", n_heads_circuit, means_run)
        issue_floor += stream_floor(first, "clean", n_heads_circuit, means_run)
    ablated_streams = {}  # one all-ablated run per means tensor (the full and the naive circuit share it)
    for engine in recorder.engines:
        if engine.head_means is not None:
            ablated_streams[id(engine._streams["ablated"])] = engine
    for engine in ablated_streams.values():
        floor += stream_floor(engine, "ablated", n_heads_circuit)
        issue_floor += stream_floor(engine, "ablated", n_heads_circuit)
    for engine, spec, start_layer in recorder.records:
        floor += spec_floor(engine, spec, start_layer)
        issue_floor += spec_floor(engine, spec, start_layer, share_rows=False)
    ours = sum(e.flops.total for e in {id(e.flops): e for e in recorder.engines}.values())
    floor_s = floor / (gflops * 1e9)
    floor_median_s = floor / (in_run["median_gflops"] * 1e9)
    floor_fastest_s = floor / (in_run["max_gflops"] * 1e9)
    row = {
        "spec": args.spec, "n": args.n, "counts": counts, "evaluated_sets": len(recorder.records),
        "forward_passes_summary": result.summary["counts"]["forward_passes"],
        "floor_flops": floor, "issue_floor_flops": issue_floor, "our_counted_flops": ours,
        "matmul_gflops": gflops, "matmul_gflops_before": gflops_before[0], "matmul_gflops_after": gflops_after[0],
        "matmul_gflops_per_cpu_second": gflops_cpu,
        # the target's ratio: at the median of the probes sampled during the run
        "probe": "; ".join(f"{name}: {p.describe()}" for name, p in probes.items()), "probe_samples": in_run,
        "floor_seconds": floor_median_s, "ratio": seconds / floor_median_s if floor else None,
        "floor_seconds_fastest_sample": floor_fastest_s,
        "ratio_fastest_sample": seconds / floor_fastest_s if floor else None,
        # as before the in-run sampling: one T-thread GEMM probe, the best of before and after
        "floor_seconds_ends": floor_s, "ratio_ends": seconds / floor_s if floor_s else None,
        "issue_floor_seconds": issue_floor / (in_run["median_gflops"] * 1e9),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds, "floor_cpu_seconds": floor / (gflops_cpu * 1e9),
        "ratio_cpu": cpu_seconds / (floor / (gflops_cpu * 1e9)) if floor else None,
        "threads": torch.get_num_threads(), "device": device_description(device),
        "parallel_chunks": ablation_engine.KnockoutEngine.PARALLEL_CHUNKS,
        "parallel": args.parallel,
    }
    if timer is not None:
        row["workers"] = timer.summary(main_cpu, seconds)  # main_cpu includes a 1-thread probe's CPU
    print(_table(row))
    if timer is not None:
        print(_worker_table(row["workers"]))
    if args.json:
        write_json(Path(args.json), {"rows": [row], "provenance": provenance(model=model, datasets=[ioi, abc])})
    return row


def _table(row: dict) -> str:
    header = (f"{'':>5} {'floor TFLOP':>11} {'issue floor TFLOP':>17} {'ours TFLOP':>10} {'GFLOPS':>7} "
              f"{'floor s':>8} {'our s':>8} {'ratio':>6}")
    lines = []
    samples = row["probe_samples"]
    for label, rate, floor_s, ours, ratio in (
        ("wall", samples["median_gflops"], row["floor_seconds"], row["seconds"], row["ratio"]),
        ("fast", samples["max_gflops"], row["floor_seconds_fastest_sample"], row["seconds"], row["ratio_fastest_sample"]),
        ("ends", row["matmul_gflops"], row["floor_seconds_ends"], row["seconds"], row["ratio_ends"]),
        ("cpu", row["matmul_gflops_per_cpu_second"], row["floor_cpu_seconds"], row["cpu_seconds"], row["ratio_cpu"]),
    ):
        lines.append(f"{label:>5} {row['floor_flops'] / 1e12:>11.3f} {row['issue_floor_flops'] / 1e12:>17.3f} "
                     f"{row['our_counted_flops'] / 1e12:>10.3f} {rate:>7.1f} {floor_s:>8.1f} {ours:>8.1f} {ratio:>5.2f}x")
    line = "\n".join(lines)
    c = row["counts"]
    note = (f"completeness, {row['spec']}, N={row['n']}, {c['GREEDY_RUNS']} greedy runs x "
            f"{c['GREEDY_ITERATIONS']} iterations x {c['GREEDY_CANDIDATES']} candidates, "
            f"{c['N_RANDOM_SETS']} random sets; {row['evaluated_sets']} knockout evaluations; "
            f"{row['threads']} threads ({PARALLEL_NOTES[row['parallel']]}), "
            f"{row['device']}")
    kinds = ", ".join(f"{name} median {k['median_gflops']:.0f}" for name, k in samples["probes"].items())
    legend = (f"wall (the target's row): the floor at the faster kind's median ({samples['rate_probe']}) of "
              f"{samples['samples']} samples of matmul probes taken between passes during the run ({row['probe']}; "
              f"{kinds}; range {samples['min_gflops']:.0f}-{samples['max_gflops']:.0f} GFLOP/s, "
              f"{samples['probe_wall_s']:.1f} s of probes taken out of ours); fast: at the fastest single sample; "
              "ends: at the best of one T-thread GEMM probe before and after the run (the rule before "
              "in-run sampling); cpu: that probe per CPU second of this process (all threads)")
    return "\n".join([note, header, "-" * len(header), line, legend])


def _worker_table(w: dict) -> str:
    return "\n".join([
        f"parallel passes: {w['parallel_passes']}, {w['pass_wall_s']:.1f} s wall in all",
        f"  worker CPU s: slowest {w['worker_cpu_max_s']:.1f}, mean {w['worker_cpu_mean_s']:.1f} "
        f"(imbalance {w['imbalance']:.3f}); worker wall / CPU {w['worker_wall_over_cpu']:.3f} (off-CPU waits)",
        f"  main thread CPU s: in the passes {w['main_cpu_in_passes_s']:.1f}, between them "
        f"{w['main_cpu_between_passes_s']:.1f}; wall outside the passes {w['wall_between_passes_s']:.1f} s",
    ])


if __name__ == "__main__":
    main()

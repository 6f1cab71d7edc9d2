"""The machine's float32 matmul throughput, sampled during a benchmark run.

The floors of ``benchmarks/knockouts.py`` and ``benchmarks/edges.py`` are FLOPs divided by the
machine's matmul throughput. On a shared host that throughput drifts by 20-40% within minutes
(the quiet run at f24c130 read 223 GFLOP/s before the completeness benchmark and 305 after it), so
a probe taken only before and after a five-minute run says little about the minutes between.

:class:`ThroughputSampler` probes between the engine's passes while the run goes on: it wraps
the function a pass calls (:meth:`ThroughputSampler.gate`), and at the first pass that starts at
least ``interval_s`` after the last sample it holds the other passes back (a pass already
running finishes first), runs the probe alone, and lets them go on. The probe's own seconds
(wall and process CPU) are added up so the caller can take them out of its timings; the time the
other workers spend waiting for a running pass to finish is *not* taken out (it counts against
the engine).

:class:`EngineShapedProbe` is the probe of how the engines run: ``T`` threads at once (the
engine's workers), each running, on one torch thread, ``repeats`` products ``[rows, d_model] x
[d_model, d_mlp]`` plus bias (the MLP's input projection, the engine's largest GEMM), FLOPs over
the wall time of the whole group (``ioi._threads.map_on_workers``: ``T`` chunks on one torch thread
each). :class:`OpenMPProbe` is the same product as one GEMM on ``T`` torch (OpenMP) threads. On the
quiet 2-core host the OpenMP GEMM read about 7% faster than two single-threaded ones side by side
(301 against 280 GFLOP/s, medians of 12 alternations, `benchmarks/probe_kinds.py`; they compete for the shared cache), so the
sampler runs both at every sample and the floor takes the faster kind's median: the machine's
best measured rate, not only the rate of the engine's own way of running.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import threading
import time
from typing import Callable

import torch


class EngineShapedProbe:
    """``T`` concurrent single-threaded ``addmm`` loops; ``probe()`` -> GFLOP/s per wall second
    (on CUDA: one loop on the device)."""

    def __init__(self, d_model: int, d_mlp: int, threads: int, device: torch.device, *, rows: int = 1024,
                 repeats: int = 8):
        self.device = torch.device(device)
        self.threads = 1 if self.device.type != "cpu" else max(1, threads)
        self.repeats = repeats
        self.flops = self.threads * repeats * 2.0 * rows * d_model * d_mlp
        self.shape = (rows, d_model, d_mlp)
        generator = torch.Generator().manual_seed(0)
        make = lambda *shape: torch.randn(*shape, generator=generator).to(self.device)  # noqa: E731
        self._operands = [(make(d_mlp), make(rows, d_model), make(d_model, d_mlp)) for _ in range(self.threads)]
        self._pool = (concurrent.futures.ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="probe")
                      if self.threads > 1 else None)
        self.probe()  # warm: thread start-up, first-touch pages, BLAS buffers

    def _loop(self, index: int) -> None:
        bias, x, weight = self._operands[index]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(self.repeats):
                torch.addmm(bias, x, weight)
        finally:
            torch.set_num_threads(threads)

    def probe(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        if self._pool is None:
            self._loop(0)
        else:
            list(self._pool.map(self._loop, range(self.threads)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.flops / (time.perf_counter() - start) / 1e9

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def describe(self) -> str:
        rows, d_model, d_mlp = self.shape
        return (f"{self.threads} thread(s) x {self.repeats} x [{rows}, {d_model}] x [{d_model}, {d_mlp}] "
                f"addmm, one torch thread each")


class OpenMPProbe:
    """One ``addmm`` loop on ``T`` torch threads (the caller's count restored); ``probe()`` ->
    GFLOP/s per wall second."""

    def __init__(self, d_model: int, d_mlp: int, threads: int, device: torch.device, *, rows: int = 1024,
                 repeats: int = 8):
        self.device = torch.device(device)
        self.threads = max(1, threads)
        self.repeats = repeats
        self.flops = repeats * 2.0 * rows * d_model * d_mlp
        self.shape = (rows, d_model, d_mlp)
        generator = torch.Generator().manual_seed(1)
        self._operands = tuple(torch.randn(*shape, generator=generator).to(self.device)
                               for shape in ((d_mlp,), (rows, d_model), (d_model, d_mlp)))
        self.probe()

    def probe(self) -> float:
        bias, x, weight = self._operands
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            for _ in range(self.repeats):
                torch.addmm(bias, x, weight)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return self.flops / (time.perf_counter() - start) / 1e9
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        rows, d_model, d_mlp = self.shape
        return f"{self.repeats} x [{rows}, {d_model}] x [{d_model}, {d_mlp}] addmm on {self.threads} torch thread(s)"


def probes_for(d_model: int, d_mlp: int, threads: int, device: torch.device, *, rows: int,
               repeats: int) -> dict:
    """The two probe kinds, by name (on CUDA only the engine-shaped one: one loop on the device)."""
    probes = {"engine": EngineShapedProbe(d_model, d_mlp, threads, device, rows=rows, repeats=repeats)}
    if torch.device(device).type == "cpu" and threads > 1:
        probes["openmp"] = OpenMPProbe(d_model, d_mlp, threads, device, rows=rows, repeats=repeats)
    return probes


class ThroughputSampler:
    """Samples every probe (name -> ``probe()`` in GFLOP/s) at most every ``interval_s`` seconds
    between passes; the rate for a floor is the faster probe kind's median (:meth:`summary`)."""

    def __init__(self, probes: dict[str, Callable[[], float]] | Callable[[], float], interval_s: float = 15.0):
        self._probes = probes if isinstance(probes, dict) else {"probe": probes}
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []  # (seconds since the start, GFLOP/s by probe)
        self.probe_wall_s = 0.0  # the probes' own wall seconds
        self.probe_cpu_s = 0.0  # and this process's CPU seconds during them
        self._origin = time.perf_counter()
        self._last: float | None = None
        self._cond = threading.Condition()
        self._running = 0  # passes running now
        self._pending = False  # a sample is waiting for the running passes to finish
        self._inside = threading.local()  # this thread's depth of gated calls (nested calls pass through)

    def sample(self) -> dict[str, float]:
        """Probe now with every kind (the caller makes sure no pass is running), and record it."""
        start, start_cpu = time.perf_counter(), time.process_time()
        rates = {name: probe() for name, probe in self._probes.items()}
        end = time.perf_counter()
        self.probe_wall_s += end - start
        self.probe_cpu_s += time.process_time() - start_cpu
        self._last = end
        self.samples.append((start - self._origin, rates))
        return rates

    def gate(self, fn: Callable) -> Callable:
        """``fn`` wrapped: before each call, take a sample if one is due (alone on the machine)."""
        sampler = self

        def gated(*args, **kwargs):
            depth = getattr(sampler._inside, "depth", 0)
            if depth:  # a pass inside a pass: no sample here (it would wait for itself)
                return fn(*args, **kwargs)
            with sampler._cond:
                while sampler._pending:
                    sampler._cond.wait()
                due = sampler._last is None or time.perf_counter() - sampler._last >= sampler.interval_s
                if due:
                    sampler._pending = True
                    while sampler._running:
                        sampler._cond.wait()
                    try:
                        sampler.sample()
                    finally:
                        sampler._pending = False
                        sampler._cond.notify_all()
                sampler._running += 1
            sampler._inside.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                sampler._inside.depth = 0
                with sampler._cond:
                    sampler._running -= 1
                    sampler._cond.notify_all()

        return gated

    def summary(self) -> dict:
        """Per probe kind: samples, median, max, min and the series; ``median_gflops`` (the floor's
        rate) is the faster kind's median, ``max_gflops``/``min_gflops`` over every sample."""
        kinds = {}
        for name in self._probes:
            values = [rates[name] for _, rates in self.samples]
            kinds[name] = {"median_gflops": statistics.median(values) if values else None,
                           "max_gflops": max(values, default=None), "min_gflops": min(values, default=None),
                           "series": [[round(t, 2), round(rates[name], 2)] for t, rates in self.samples]}
        rate_probe = max(kinds, key=lambda name: kinds[name]["median_gflops"] or 0.0)
        every = [rate for _, rates in self.samples for rate in rates.values()]
        return {
            "samples": len(self.samples), "interval_s": self.interval_s, "rate_probe": rate_probe,
            "median_gflops": kinds[rate_probe]["median_gflops"],
            "max_gflops": max(every, default=None), "min_gflops": min(every, default=None),
            "probe_wall_s": self.probe_wall_s, "probe_cpu_s": self.probe_cpu_s, "probes": kinds,
        }

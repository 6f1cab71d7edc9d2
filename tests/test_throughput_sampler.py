"""``benchmarks/_throughput.py``: the matmul probe sampled between passes of a run.

The gate must take a sample only while no pass runs, at most once per interval, let nested
calls through (no self-wait), and account for the probe's own seconds."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _throughput import EngineShapedProbe, OpenMPProbe, ThroughputSampler, probes_for  # noqa: E402


def test_samples_only_between_passes_on_two_workers():
    running = []  # passes running when each probe started
    state = {"running": 0}
    lock = threading.Lock()

    def probe():
        with lock:
            running.append(state["running"])
        time.sleep(0.01)
        return 100.0

    sampler = ThroughputSampler(probe, interval_s=0.0)  # due before every pass

    @sampler.gate
    def one_pass(i):
        with lock:
            state["running"] += 1
        time.sleep(0.002)
        with lock:
            state["running"] -= 1
        return i

    out = []
    workers = [threading.Thread(target=lambda: out.extend(one_pass(i) for i in range(20))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)
    assert sorted(out) == sorted(list(range(20)) * 2)
    assert running and set(running) == {0}  # the probe never overlapped a pass
    summary = sampler.summary()
    assert summary["samples"] == len(running) and summary["median_gflops"] == 100.0
    assert summary["probe_wall_s"] >= 0.01 * len(running) * 0.9


def test_interval_and_nested_calls():
    calls = []
    sampler = ThroughputSampler(lambda: calls.append(1) or 50.0, interval_s=3600.0)

    @sampler.gate
    def outer(depth):
        return inner(depth) if depth else 0

    @sampler.gate
    def inner(depth):
        return outer(depth - 1) + 1

    assert outer(3) == 3  # nested gated calls pass through instead of waiting for themselves
    assert outer(1) == 1
    assert len(calls) == 1  # the first call samples; the interval holds off the others


def test_engine_shaped_probe_counts_flops():
    probe = EngineShapedProbe(16, 64, threads=2, device=torch.device("cpu"), rows=32, repeats=2)
    try:
        assert probe.flops == 2 * 2 * 2.0 * 32 * 16 * 64
        assert probe.probe() > 0
        assert "2 thread(s)" in probe.describe()
    finally:
        probe.close()
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("threads", [1, 3])
def test_probe_restores_thread_count(threads):
    before = torch.get_num_threads()
    probe = EngineShapedProbe(8, 8, threads=threads, device=torch.device("cpu"), rows=8, repeats=1)
    probe.probe()
    probe.close()
    assert torch.get_num_threads() == before


def test_the_floor_rate_is_the_faster_kinds_median():
    rates = iter([(100.0, 90.0), (120.0, 200.0), (80.0, 210.0)])
    current = {}

    def kind(index):
        def probe():
            if index == 0:
                current["pair"] = next(rates)
            return current["pair"][index]
        return probe

    sampler = ThroughputSampler({"engine": kind(0), "openmp": kind(1)}, interval_s=0.0)
    for _ in range(3):
        sampler.sample()
    summary = sampler.summary()
    assert summary["probes"]["engine"]["median_gflops"] == 100.0
    assert summary["probes"]["openmp"]["median_gflops"] == 200.0
    assert summary["rate_probe"] == "openmp" and summary["median_gflops"] == 200.0
    assert summary["max_gflops"] == 210.0 and summary["min_gflops"] == 80.0


def test_probes_for_a_cpu_with_two_threads_are_both_kinds():
    before = torch.get_num_threads()
    probes = probes_for(8, 16, 2, torch.device("cpu"), rows=8, repeats=1)
    try:
        assert set(probes) == {"engine", "openmp"}
        assert isinstance(probes["openmp"], OpenMPProbe) and probes["openmp"].probe() > 0
        assert torch.get_num_threads() == before
    finally:
        for probe in probes.values():
            probe.close()
    assert set(probes_for(8, 16, 1, torch.device("cpu"), rows=8, repeats=1)) == {"engine"}

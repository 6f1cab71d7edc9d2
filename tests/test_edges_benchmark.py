"""Smoke test of ``benchmarks/edges.py`` on a tiny model (timings are never asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_edges_benchmark_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("edges", None)
    import edges

    out = tmp_path / "edges.json"
    rows = edges.main(["--model", "random-L2-H3-D12", "--n", "4", "--circuits", "3", "--random-circuits", "3", "--skip", "acdc",
                       "--json", str(out)])
    assert [row["experiment"] for row in rows] == ["eap_all_edges", "circuits_exact", "circuits_exact"]
    for row in rows[1:]:
        assert row["n_circuits"] == 3 and row["floor_seconds"] > 0 and row["ratio_to_floor"] > 0
        samples = row["probe_samples"]  # the probe sampled during the run: at least the first pass and the end
        assert samples["samples"] >= 2 and samples["min_gflops"] <= samples["median_gflops"] <= samples["max_gflops"]
        assert row["floor_seconds"] == pytest.approx(row["floor_flops"] / (samples["median_gflops"] * 1e9))
    saved = json.loads(out.read_text())
    assert saved["provenance"]["N"] == 4 and saved["provenance"]["matmul_gflops_before"] > 0
    assert "x floor" in capsys.readouterr().out

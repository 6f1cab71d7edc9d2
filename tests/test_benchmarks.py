"""Smoke test of ``benchmarks/patching.py`` on a tiny model: every experiment runs both ways,
agrees to 1e-4 and lands in the table and the JSON file. (Timings are never asserted.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EXPERIMENTS = {"attn_head_out_all_pos", "attn_head_all_pos_every", "resid_pre", "logits_all_positions",
               "logits_end", "nm_queries_q_end", "sinh_values_v_s2"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patching_benchmark_runs_every_experiment(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("patching", None)
    import patching

    out = tmp_path / "bench.json"
    rows = patching.main(["--model", "random-L2-H3-D12", "--n", "5", "--reference-patches", "2",
                          "--reference-senders", "2", "--json", str(out)])
    assert {row["experiment"] for row in rows} == EXPERIMENTS
    for row in rows:
        assert row["max_abs_diff"] <= 1e-4, row
        assert row["seconds_fast"] > 0 and row["seconds_reference"] > 0
        assert row["speedup_as_called"] > 0 and row["speedup_end_to_end"] > 0
        assert (row["target_speedup"] is None) == (row["meets_target"] is None)
    saved = json.loads(out.read_text())
    record = saved["provenance"]
    assert record["N"] == 5 and record["seed"] == 0 and len(record["dataset_hash"]) == 64
    assert record["packages"]["torch"] and "git_commit" in record and record["model"]["spec"] == "random-L2-H3-D12"
    assert {row["experiment"] for row in saved["rows"]} == EXPERIMENTS
    table = capsys.readouterr().out.split("model random-L2-H3-D12")[-1]
    assert all(name in table for name in EXPERIMENTS)
    assert "as called" in table and "end to end" in table


def test_dag_benchmark_smoke(tmp_path, monkeypatch, capsys):
    """benchmarks/dag.py at CI size: the planted model, N scaled down, two experiments (and their
    figures); the JSON has the issue's fields, one row per benchmarked job with its own seconds."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("dag", None)
    import dag

    out = tmp_path / "dag.json"
    report = dag.main(["--planted", "--n-scale", "0.01", "--experiments", "baseline,example_prompts",
                       "--cores", "2", "--threads-per-job", "1", "--scratch", str(tmp_path / "scratch"),
                       "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert {"total_wall_s", "cores", "threads", "device", "rules"} <= set(saved)
    assert saved["cores"] == 2 and saved["threads"] == 1 and saved["device"].startswith("cpu")
    rules = {row["rule"]: row for row in saved["rules"]}
    assert {"load_model", "selfcheck", "experiment:baseline", "experiment:example_prompts",
            "figure:baseline_logit_diff", "figure:logit_diff_table"} <= set(rules)
    base = {"rule", "wall_s", "own_s", "overhead_s", "max_rss_mb", "mem_mb", "start_s", "end_s"}
    for row in saved["rules"]:
        assert base <= set(row) <= base | {"threads"}, row
        assert row["wall_s"] > 0 and row["max_rss_mb"] > 0
        # each job's interval lies inside the DAG's run
        assert -1.0 <= row["start_s"] <= row["end_s"] <= saved["total_wall_s"] + 1.0, row
    assert rules["experiment:baseline"]["threads"] == 1
    # completeness was not run: no split of the DAG's time around it
    assert saved["rest_wall_s"] is None and saved["completeness_overlap_s"] is None
    from ioi.registry import EXPERIMENTS

    # the declared memory is the scheduler's: the registry's for experiments, the rules' otherwise
    assert rules["experiment:baseline"]["mem_mb"] == EXPERIMENTS["baseline"].mem_mb
    assert rules["selfcheck"]["mem_mb"] == 5000 and rules["figure:logit_diff_table"]["mem_mb"] == 1000
    assert rules["load_model"]["mem_mb"] == 3000
    for name in ("load_model", "selfcheck", "experiment:baseline"):
        assert rules[name]["own_s"] > 0 and rules[name]["overhead_s"] is not None
    # the model's load is the load job's own work (the model server's start), not the self-check's:
    # the self-check starts after it and is served by that server
    assert rules["selfcheck"]["start_s"] >= rules["load_model"]["end_s"] - 1.0
    assert rules["load_model"]["own_s"] <= rules["load_model"]["wall_s"]
    selfcheck_log = (tmp_path / "scratch" / "logs" / "bench-planted-ioi" / "selfcheck.log").read_text()
    assert "served by the model server" in selfcheck_log
    assert "whole DAG" in capsys.readouterr().out


def test_dag_benchmark_completeness_split(monkeypatch):
    """rest_wall_s is the DAG minus completeness; the overlap counts other jobs' seconds beside it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("dag", None)
    import dag

    rows = [{"rule": "experiment:completeness", "wall_s": 100.0, "start_s": 10.0, "end_s": 110.0},
            {"rule": "experiment:baseline", "wall_s": 10.0, "start_s": 0.0, "end_s": 10.0},
            {"rule": "figure:x", "wall_s": 5.0, "start_s": 110.0, "end_s": 115.0}]
    assert dag.completeness_split(rows, 120.0) == {"completeness_wall_s": 100.0, "rest_wall_s": 20.0,
                                                   "completeness_overlap_s": 0.0}
    rows[1].update(start_s=5.0, end_s=15.0)  # 5 s beside completeness
    rows[2].update(start_s=100.0, end_s=105.0)  # 5 more
    assert dag.completeness_split(rows, 120.0)["completeness_overlap_s"] == 10.0

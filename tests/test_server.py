"""The model server (ioi.server): jobs served by one process per model give the same files as jobs
run in their own process, a second job reuses the running server, and a failing job's status
reaches the client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ioi import server

SPEC = "random-L2-H4-D16"


def _selfcheck(tmp_path: Path, name: str) -> dict:
    server.dispatch("selfcheck", log=f"logs/{name}.log", model_spec=SPEC, model_label="x",
                    out_path=f"out/{name}.json", seed=0, device="cpu", dataset_settings={}, n=2,
                    threads=1)
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


@pytest.fixture
def server_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IOI_MODEL_SERVER_DIR", str(tmp_path))
    monkeypatch.setenv("IOI_MODEL_SERVER_IDLE_S", "30")
    yield tmp_path
    for sock in tmp_path.glob("*.sock"):
        sock.unlink()  # the server stops when its socket goes


def test_served_jobs_equal_jobs_in_their_own_process(server_dir, monkeypatch):
    monkeypatch.setenv("IOI_MODEL_SERVER", "1")
    first = _selfcheck(server_dir, "first")
    t0 = time.perf_counter()
    second = _selfcheck(server_dir, "second")
    served_wall = time.perf_counter() - t0
    monkeypatch.setenv("IOI_MODEL_SERVER", "0")
    alone = _selfcheck(server_dir, "alone")
    for record in (second, alone):
        assert record["engine"]["comparisons"] == first["engine"]["comparisons"]  # bit-identical
        assert record["identity"]["ours"] == first["identity"]["ours"]
    logs = list((server_dir / "logs" / "model-server").glob("*.log"))
    assert len(logs) == 1 and logs[0].read_text().count("loaded in") == 1  # one server, one load
    assert "self-check passed" in (server_dir / "logs" / "second.log").read_text()
    # the served job's wall time is its own work plus well under a second of overhead (a loose
    # bound, so a busy CI machine cannot fail it; timings are measured by benchmarks/dag.py)
    assert served_wall < second["seconds"] + 30


def test_a_failing_served_job_fails_the_client(server_dir, monkeypatch, capsys):
    monkeypatch.setenv("IOI_MODEL_SERVER", "1")
    with pytest.raises(SystemExit) as exit_:
        server.dispatch("experiment", log="logs/bad.log", name="no-such-experiment", model_spec=SPEC,
                        model_label="x", dataset_paths={}, out_dir="out/bad", n=2, seed=0,
                        device="cpu", dataset_settings={}, memory_budget_mb=64, threads=1)
    assert exit_.value.code == 1
    assert "no-such-experiment" in (server_dir / "logs" / "bad.log").read_text()
    assert "model server's child" in capsys.readouterr().err


def test_a_new_library_or_model_gets_a_new_server():
    key = server.server_key(SPEC, "cpu", 0)
    assert key == server.server_key(SPEC, "cpu", 0)
    assert key != server.server_key("random-L3-H2-D8", "cpu", 0)
    assert key != server.server_key(SPEC, "cpu", 1)


def _figure_job(png: str, pdf: str, name: str = "logit_lens", base: str = "exp/logit_lens") -> None:
    server.dispatch("figure", log=f"logs/{Path(png).parent}.log", name=name, data_csv=f"{base}/data.csv",
                    summary_json=f"{base}/summary.json", meta_json=f"{base}/meta.json", png=png, pdf=pdf)


def test_served_figures_equal_figures_drawn_in_their_own_process(server_dir, monkeypatch, capsys, tiny_model):
    """A figure job served by the plot server (a forked child, the client's environment and folder)
    writes the same PNG and PDF bytes as the job drawn in its own process; a failing figure job
    fails its client with the error in its log."""
    from ioi.pipeline import make_datasets, run_experiment_job

    make_datasets(n=4, seed=0, settings={}, ioi_path="data/ioi.parquet", abc_path="data/abc.parquet",
                  meta_path="data/meta.json")
    run_experiment_job(name="logit_lens", model_spec=SPEC, model_label="x", dataset_paths={"ioi": "data/ioi.parquet"},
                       out_dir="exp/logit_lens", n=4, seed=0, device="cpu", dataset_settings={}, memory_budget_mb=256,
                       model=tiny_model)
    # The PDF's creation date comes from SOURCE_DATE_EPOCH: the server starts with one date, the
    # later jobs' clients have another, which their children must take.
    monkeypatch.setenv("IOI_MODEL_SERVER", "1")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1600000000")
    _figure_job("first/f.png", "first/f.pdf")  # starts the plot server
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    _figure_job("served/f.png", "served/f.pdf")
    monkeypatch.setenv("IOI_MODEL_SERVER", "0")
    _figure_job("alone/f.png", "alone/f.pdf")
    for ext in ("png", "pdf"):
        assert (server_dir / "served" / f"f.{ext}").read_bytes() == (server_dir / "alone" / f"f.{ext}").read_bytes()
    assert (server_dir / "first" / "f.pdf").read_bytes() != (server_dir / "alone" / "f.pdf").read_bytes()
    monkeypatch.setenv("IOI_MODEL_SERVER", "1")
    logs = list((server_dir / "logs" / "model-server").glob("ioi-plots-*.log"))
    assert len(logs) == 1 and logs[0].read_text().count("plot server:") == 1  # one server for both
    assert "served by the plot server" in (server_dir / "logs" / "served.log").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _figure_job("bad/f.png", "bad/f.pdf", base="exp/missing")
    assert exit_.value.code == 1
    assert "exp/missing/data.csv" in (server_dir / "logs" / "bad.log").read_text()
    assert "plot server's child" in capsys.readouterr().err
    assert not (server_dir / "bad" / "f.png").exists()


def test_warm_plain_weights_caches_the_weights_a_job_builds(tiny_model):
    """The server builds the plain-tensor weights before forking: a job then gets the cached
    object, equal tensor by tensor to the weights it would build itself (the slow twin)."""
    import dataclasses

    import torch

    from ioi import plain_forward
    from ioi.patching._fast_forward import NetWeights

    server.warm_plain_weights(tiny_model)
    cached = plain_forward.weights(tiny_model)
    assert plain_forward.weights(tiny_model) is cached
    fresh = NetWeights.from_bridge(tiny_model, tiny_model.W_U.device)
    for field in dataclasses.fields(NetWeights):
        a, b = getattr(cached, field.name), getattr(fresh, field.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), field.name

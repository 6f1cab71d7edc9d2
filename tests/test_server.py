"""The model server (ioi.server): jobs served by one process per model give the same files as jobs
run in their own process, a second job reuses the running server, and a failing job's status
reaches the client. The load job (workflow rule load_model) starts the server and counts its start
as its own seconds; with the server off it loads the model itself; a missing model fails it with
the one-paragraph message; a job that finds the server gone (idled out) starts one and says so."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from ioi import server

SPEC = "random-L2-H4-D16"


def _load(tmp_path: Path, name: str, spec: str = SPEC) -> dict:
    server.dispatch("load_model", log=f"logs/{name}.log", model_spec=spec, model_label="x",
                    out_path=f"out/{name}.json", seed=0, device="cpu", dtype="float32", threads=1)
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


def _selfcheck(tmp_path: Path, name: str) -> dict:
    server.dispatch("selfcheck", log=f"logs/{name}.log", model_spec=SPEC, model_label="x",
                    out_path=f"out/{name}.json", seed=0, device="cpu", dataset_settings={}, n=2,
                    threads=1)
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


@pytest.fixture
def server_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The sockets in a short folder of their own: an AF_UNIX path holds at most 107 bytes, and
    # pytest-xdist's per-worker temporary folders (``.../popen-gw0/<test>0/``) can pass that.
    sockets = Path(tempfile.mkdtemp(prefix="ioi-srv-", dir="/tmp"))
    monkeypatch.setenv("IOI_MODEL_SERVER_DIR", str(sockets))
    monkeypatch.setenv("IOI_MODEL_SERVER_IDLE_S", "30")
    yield tmp_path
    for sock in sockets.glob("*.sock"):
        sock.unlink()  # the server stops when its socket goes
    shutil.rmtree(sockets, ignore_errors=True)


def test_served_jobs_equal_jobs_in_their_own_process(server_dir, monkeypatch, capsys):
    monkeypatch.setenv("IOI_MODEL_SERVER", "1")
    loaded = _load(server_dir, "load")  # starts the server: its start is this job's own seconds
    assert loaded["load"]["served"] and loaded["load"]["started_by_this_job"], loaded["load"]
    started = loaded["load"]["server"]
    assert loaded["seconds"] > 0 and started["ready_s"] > 0 and started["pid"] > 0
    assert set(started["parts_s"]) == {"python_and_torch_imports", "load_model",
                                       "runner_imports_and_plain_weights"}
    assert loaded["model"]["spec"] == SPEC and loaded["dtype"] == "float32"
    assert {"git_commit", "packages", "device", "max_rss_mb"} <= set(loaded)
    first = _selfcheck(server_dir, "first")
    t0 = time.perf_counter()
    second = _selfcheck(server_dir, "second")
    served_wall = time.perf_counter() - t0
    again = _load(server_dir, "again")  # the server runs: nothing loaded, no seconds
    assert again["load"]["served"] and not again["load"]["started_by_this_job"]
    assert again["seconds"] == 0 and again["load"]["server"]["pid"] == started["pid"]
    assert "no model server was running" not in capsys.readouterr().err  # the load job started it
    monkeypatch.setenv("IOI_MODEL_SERVER", "0")
    alone = _selfcheck(server_dir, "alone")
    in_process = _load(server_dir, "in-process")  # server off: loaded in the job, its seconds the load
    assert not in_process["load"]["served"] and "model_server off" in in_process["load"]["reason"]
    assert in_process["seconds"] > 0 and in_process["model"] == loaded["model"]
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


def test_a_missing_model_fails_the_load_job_with_its_message(server_dir, monkeypatch, capsys):
    """The server cannot load a missing checkpoint and exits; the load job then loads in its own
    process and ends with the loader's one-paragraph message naming the fix (exit status 2, no
    traceback) and no model.json."""
    monkeypatch.setenv("IOI_MODEL_SERVER", "1")
    missing = str(server_dir / "no-such-checkpoint")
    with pytest.raises(SystemExit) as exit_:
        _load(server_dir, "missing", spec=missing)
    assert exit_.value.code == 2
    log = (server_dir / "logs" / "missing.log").read_text()
    assert f"Unknown model spec {missing!r}" in log and "no such path exists" in log
    assert "Traceback" not in log and "no such path exists" in capsys.readouterr().err
    assert not (server_dir / "out" / "missing.json").exists()


def test_a_job_after_the_server_idled_out_starts_one_and_says_so(server_dir, monkeypatch, capsys):
    """IOI_MODEL_SERVER_IDLE_S: the server the load job started exits when idle; the next model job
    finds none, starts one (it pays the load) and says so on its stderr; its result is the same."""
    monkeypatch.setenv("IOI_MODEL_SERVER", "1")
    monkeypatch.setenv("IOI_MODEL_SERVER_IDLE_S", "0.5")
    loaded = _load(server_dir, "load")
    sock = Path(loaded["load"]["server"]["socket"])
    deadline = time.monotonic() + 30
    while sock.exists() and time.monotonic() < deadline:  # the idle server removes its socket
        time.sleep(0.2)
    assert not sock.exists()
    capsys.readouterr()
    record = _selfcheck(server_dir, "after-idle")
    assert "no model server was running" in capsys.readouterr().err
    assert record["engine"]["passed"]
    logs = list((server_dir / "logs" / "model-server").glob("ioi-model-*.log"))
    assert len(logs) == 1 and logs[0].read_text().count("loaded in") == 2  # two servers, one after the other


def test_a_socket_path_too_long_runs_jobs_in_their_own_process(tmp_path, capsys):
    """A Unix socket's path holds at most 107 bytes: no server is started (it could never bind),
    so the job runs in its own process at once instead of after a failed server start."""
    path = tmp_path / ("x" * 120 + ".sock")
    assert server._server_connection(path, ["--spec", SPEC], tmp_path / "logs") == (None, None)
    assert "IOI_MODEL_SERVER_DIR" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_the_model_server_key_ignores_the_plotting_code_only(tmp_path, monkeypatch):
    """Editing a plot module needs a new plot server but not a new model server (model jobs never
    import it, and the load job does not re-run for it); editing any other module needs both."""
    package = tmp_path / "ioi"
    (package / "plots").mkdir(parents=True)
    for name in ("pipeline.py", "labels.py", "plots/common.py"):
        (package / name).write_text("x = 1\n")
    monkeypatch.setattr(server, "PACKAGE_DIR", package)
    model, plots = server.server_key(SPEC, "cpu", 0), server.plot_server_key()
    for name in ("plots/common.py", "labels.py"):
        (package / name).write_text("x = 22\n")
        assert server.server_key(SPEC, "cpu", 0) == model and server.plot_server_key() != plots
        plots = server.plot_server_key()
    (package / "pipeline.py").write_text("x = 22\n")
    assert server.server_key(SPEC, "cpu", 0) != model and server.plot_server_key() != plots

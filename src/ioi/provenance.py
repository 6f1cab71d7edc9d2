"""Provenance and atomic output writing.

Every result file is written atomically (to a temporary file in the same folder, then renamed), so a
crash never leaves a partial file that looks complete, and comes with a metadata JSON recording what
produced it: model, N, seed, templates, device, dtype, package versions, git commit, dataset hash,
seconds taken.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

TRACKED_PACKAGES = (
    "torch",
    "transformer-lens",
    "transformers",
    "numpy",
    "pandas",
    "einops",
    "matplotlib",
    "seaborn",
    "snakemake",
)


def package_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that decide our numbers (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# The workflow's own outputs, some of them committed (the demo gallery, the GPT-2 comparison):
# regenerating them is not a change to the code that computes them, so they never mark a run dirty.
GENERATED_PATHS = ("figures", "results", "paper_comparison.md", "benchmarks/measured")


def git_commit(repo: str | Path | None = None) -> str | None:
    """The current commit of the repository, with ``-dirty`` if there are uncommitted changes to
    anything but the generated outputs (:data:`GENERATED_PATHS`)."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
             *(f":(top,exclude){path}" for path in GENERATED_PATHS)],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere).
    Hosts of one machine kind differ (this project's 2-core machines have read about 146 and about
    55 GFLOP/s on one thread, the second an AVX2 AMD EPYC), so timings name it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_description(device: str | torch.device) -> str:
    """``cuda:<card>``, or ``cpu:<arch>:<threads>threads (<CPU model>, <torch's CPU kernels>)``."""
    import torch  # lazily: figure and dataset jobs write provenance without loading torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"
            f" ({cpu_model()}, {capability})")


def provenance(model=None, *, extra: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A metadata record: the model's :class:`ioi.models.ModelInfo`, versions, commit, time, extras."""
    record: dict[str, Any] = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": package_versions(),
    }
    info = getattr(model, "ioi_info", None)
    if info is not None:
        record["model"] = info.as_dict()
        record["device"] = device_description(info.device)
        record["dtype"] = info.dtype
    record.update(fields)
    if extra:
        record.update(extra)
    return record


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, 2-space indent)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, frame) -> None:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start

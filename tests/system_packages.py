"""Debian packages some tests need (chromium, slurm-wlm, munge): installed on demand when the tests
run as root (as CI does, on a fresh machine), else the test is skipped with the command to run.
``.ci/run`` installs them up front with the same helper (``python tests/system_packages.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Debian package -> the program that says it is installed
PACKAGES = {"chromium": "chromium", "slurm-wlm": "slurmctld", "munge": "munged"}


def missing(packages=PACKAGES) -> list[str]:
    return [package for package, program in packages.items()
            if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}")]


def ensure(*packages: str) -> str | None:
    """Install the ``packages`` that are absent (one ``apt-get update``, only when something is
    missing). Returns None when all are there, else why they could not be installed."""
    wanted = {p: PACKAGES[p] for p in (packages or PACKAGES)}
    absent = missing(wanted)
    if not absent:
        return None
    command = f"apt-get update && apt-get install -y --no-install-recommends {' '.join(absent)}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"needs Debian packages {absent}: run `{command}` as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *absent]):
        done = subprocess.run(step, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return f"`{' '.join(step)}` failed: {done.stderr[-1500:]}"
    still = missing(wanted)
    return f"installed but still missing: {still}" if still else None


if __name__ == "__main__":
    reason = ensure(*sys.argv[1:])
    if reason:
        print(reason, file=sys.stderr)
        sys.exit(1)
    print("system packages present: " + ", ".join(sys.argv[1:] or PACKAGES))

"""Options for the replication tests: which results folder and which reference file to check."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pytest_addoption(parser):
    group = parser.getgroup("replication")
    group.addoption("--results", default=str(ROOT / "results" / "gpt2-small"),
                    help="results folder of the model to check against paper_reference.yaml")
    group.addoption("--reference", default=str(ROOT / "paper_reference.yaml"),
                    help="claims file (default: the paper's)")

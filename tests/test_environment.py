"""pyproject.toml and environment.yml pin the same versions, and what is installed matches them."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;]+)$")


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = PIN.match(requirement.strip())
        assert match, f"unpinned requirement: {requirement!r}"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    return _pins(requirements)


def _conda_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return _pins([r for r in pip_section if not r.startswith("-e")])


def test_every_dependency_is_pinned_identically():
    assert _pyproject_pins() == _conda_pins()


def test_installed_versions_match_the_pins():
    for name, version in _pyproject_pins().items():
        installed = importlib.metadata.version(name)
        assert installed.split("+")[0] == version, f"{name}: installed {installed}, pinned {version}"

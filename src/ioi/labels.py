"""How the outputs name the model they came from: never a machine path (figure titles, the report's
figure captions). No plotting or torch imports, so the Snakefile can use it when it builds jobs."""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Mapping


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "~", "./", "../")) or "/" in spec or "\\" in spec


def model_label(meta: Mapping) -> str:
    """How figures name the model of ``meta``: never a machine path. A local checkpoint is named
    by the run's model name (config ``model_name``, recorded as ``meta["model_label"]``) or else
    its folder's name; the planted and random models say they are not GPT-2."""
    model = meta.get("model", {})
    spec = str(model.get("spec", "unknown model"))
    if spec == "planted-ioi":
        return "planted-circuit model (not GPT-2)"
    if spec.startswith("random-"):
        return f"{spec} (random weights, not GPT-2)"
    if _looks_like_path(spec):
        folder = PurePath(spec.rstrip("/\\")).name
        name = str(meta.get("model_label") or "")
        # No model_name: the workflow's folder slug (ioi.models.model_slug) names the folder.
        if not name or name == "local-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", folder):
            name = folder
        if _looks_like_path(name):
            name = PurePath(name.rstrip("/\\")).name
        return f"{name} (local checkpoint)"
    return spec

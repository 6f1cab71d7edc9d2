"""Interactive attention patterns of the circuit's heads, class by class, as one self-contained
HTML page (the seed notebook's ``circuitsvis.attention.attention_heads`` view).

circuitsvis renders with a React bundle. By default it imports that bundle from a CDN
(``render_cdn``), which a reader offline cannot reach; its PyPI wheel also ships the bundle itself
(``circuitsvis/dist/cdn/iife.js``, what its ``render_local`` inlines). This page inlines that file
once, in a classic ``<script>`` (it defines the global ``CircuitsVis``), and renders one
``AttentionHeads`` element per view (every circuit head, named with its class), so the file opens
with no network access.

The bundle is read from the installed package's files without importing ``circuitsvis`` (whose
``__init__`` imports torch): figure jobs stay free of torch.
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from ioi.plots.common import model_title, outline_label

BUNDLE = ("dist", "cdn", "iife.js")


def circuitsvis_bundle() -> tuple[str, str]:
    """(JavaScript of circuitsvis's browser bundle, circuitsvis version), from its installed files."""
    spec = importlib.util.find_spec("circuitsvis")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("circuitsvis is not installed: pip install circuitsvis==1.43.3 (pyproject.toml)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*BUNDLE)
    if not path.exists():
        raise RuntimeError(f"circuitsvis {importlib.metadata.version('circuitsvis')} has no bundled "
                           f"{'/'.join(BUNDLE)}; install the pinned circuitsvis==1.43.3")
    # A literal "</script" would end the inline script early (circuitsvis's render_local drops it).
    return path.read_text(encoding="utf-8").replace("</script", "<\\/script"), importlib.metadata.version("circuitsvis")


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def _patterns(frame, summary, view: str) -> dict[str, list]:
    """``"layer.head" -> [query][key]`` attention (rounded to 4 decimals) for one view."""
    size = len(summary["token_labels"])
    out = {}
    rows = frame[frame["view"] == view]
    for info in summary["heads"]:
        layer, head = (int(v) for v in info["head"].split("."))
        part = rows[(rows["layer"] == layer) & (rows["head"] == head)]
        matrix = np.zeros((size, size))
        matrix[part["query"].to_numpy(int), part["key"].to_numpy(int)] = part["attention"].to_numpy(float)
        out[info["head"]] = np.round(matrix, 4).tolist()
    return out


def attention_patterns_html(frame, summary: Mapping, meta: Mapping) -> str:
    """The page: the circuit's heads by class, and an ``AttentionHeads`` view of all of them
    (named ``"layer.head (class)"``, in class order) on the template mean (role-labelled tokens)
    and on one prompt (its own tokens)."""
    bundle, version = circuitsvis_bundle()
    title = model_title("Attention patterns of the circuit's heads, by class", meta)
    views = {
        "mean": (summary["token_labels"],
                 f"mean over the {summary['n_prompts_template']} prompts of template {summary['template']} "
                 "(positions aligned; IOI positions named by role)"),
        "prompt": (summary["prompt_tokens"], f"one prompt: \"{summary['example_sentence']}\""),
    }
    patterns = {view: _patterns(frame, summary, view) for view in views}
    heads = [info["head"] for info in summary["heads"]]
    names = [f"{info['head']} ({info['class']})" for info in summary["heads"]]
    classes: dict[str, list[str]] = {}
    for info in summary["heads"]:
        classes.setdefault(info["class"], []).append(info["head"])
    index = "\n".join(f'<li data-class="{html.escape(cls)}"><b>{html.escape(cls)}</b>: '
                      f'{html.escape(", ".join(members))}</li>' for cls, members in classes.items())
    sections, calls = [f"<ul>\n{index}\n</ul>"], []
    for view, (tokens, caption) in views.items():
        element = f"cv-{view}"
        sections.append(f'<section data-view="{view}">\n<h2>{html.escape(caption)}</h2>\n'
                        f'<div id="{element}" class="cv"></div>\n</section>')
        props = {"attention": [patterns[view][h] for h in heads], "tokens": list(tokens),
                 "attentionHeadNames": names, "maskUpperTri": True}
        calls.append(f'CircuitsVis.render("{element}", CircuitsVis.AttentionHeads, {_json(props)});')
    heading = html.escape(title).replace("\n", "<br>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title.replace(chr(10), ' - '))}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; max-width: 1200px; }} .cv {{ margin: 10px 0 30px; }}</style>
</head>
<body>
<h1>{heading}</h1>
<p>Attention probability from each query (destination) position to each key (source) position,
blocks.L.attn.hook_pattern, for every head of the circuit ({html.escape(outline_label(meta))}).
Hover over a head to view it, click to lock it; hover over a cell to read its value. Rendered with circuitsvis
{html.escape(version)}, whose JavaScript bundle is inlined below: the page needs no network.</p>
{chr(10).join(sections)}
<script>
{bundle}
</script>
<script>
{chr(10).join(calls)}
</script>
</body>
</html>
"""

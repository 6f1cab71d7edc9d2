"""The whole figure DAG, timed per rule (issue 11 item 3).

Builds a GPT-2-small-shaped checkpoint with seeded random weights (GPT-2 small's cost; these are
timings, never GPT-2 results), saves it with ``save_pretrained`` into a scratch folder, runs the
whole workflow there (``snakemake --cores C --configfile <scratch config>`` with ``model_path`` =
the checkpoint, the paper's N from ``config/config.yaml`` unless scaled), and prints one table per
rule from Snakemake's benchmark files (``results/{model}/benchmarks/*.tsv``: wall seconds, max RSS)
and the jobs' own work seconds (``meta.json`` ``seconds``, the self-check's ``selfcheck.json``, the
model load's ``model/model.json``; ``overhead_s`` = wall - own: the script's start, the connection
to the model server, imports). The model is loaded once per run by the ``load_model`` rule: its own
seconds are that load (with the model server on, the server's start: Python and torch's imports,
the load, the plain weights), so no later job counts it as overhead. Peak memory is the larger of the benchmark's and the job's own
``max_rss_mb`` (a job served by the model server, ``ioi.server``, is a forked child whose memory the
benchmark of the client cannot see). With ``--json FILE`` it also writes

    {"total_wall_s", "cores", "threads", "device", "rules": [{"rule", "wall_s", "own_s",
     "overhead_s", "max_rss_mb", "mem_mb"}, ...], "settings", "provenance"}

(``mem_mb``: the memory the job declares to the scheduler; the table flags a peak above it), and
each row's ``threads`` (from the job's device string) and ``start_s``/``end_s`` (seconds after the
DAG's start: the benchmark file's modification time, minus its wall seconds). ``rest_wall_s`` is
the whole DAG's wall time minus completeness's, valid because completeness takes every core
(``ioi.registry`` ``all_cores``) and so runs alone: ``completeness_overlap_s``, the seconds any
other job ran beside it, says so (0 when it ran alone).

Full scale (the lead runs this on a quiet machine; about an hour on 2 CPU cores):

    python benchmarks/dag.py --cores 2 --json benchmarks/measured/dag_cpu_2cores.json

Reduced settings for a smoke test: ``--planted`` (the planted-circuit model instead of the
GPT-2-shaped checkpoint), ``--shape L2-H4-D16`` (a smaller random checkpoint), ``--n-scale 0.05``
(every N times 0.05, at least 2), ``--experiments a,b`` (only these experiments, their figures,
no comparison).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
# What the scratch folder links to (the workflow reads them relative to its working directory).
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "src", "paper_reference.yaml", "tests")
MIN_N = 2


def build_checkpoint(folder: Path, shape: str, seed: int) -> Path:
    """A GPT-2-architecture checkpoint of ``shape`` (``gpt2-small`` or ``L{l}-H{h}-D{d}``) with
    Hugging Face's seeded random initialisation, and GPT-2's tokenizer, saved in ``folder``."""
    from ioi.models import build_random_hf_model
    from ioi.tokenizer import get_gpt2_tokenizer

    if not (folder / "config.json").exists():
        build_random_hf_model(f"random-{shape}", seed=seed).save_pretrained(folder)
        get_gpt2_tokenizer().save_pretrained(folder)
    return folder


def scaled_n(n_scale: float) -> dict[str, int]:
    """The config's N per experiment (``config/config.yaml``, the paper's), times ``n_scale``."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["n"]
    return {key: max(MIN_N, int(math.ceil(value * n_scale))) for key, value in base.items()}


def prepare_scratch(scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        link = scratch / name
        if not link.exists():
            link.symlink_to(REPO / name)


def targets_for(experiments: list[str] | None, model_name: str) -> list[str]:
    """Snakemake targets: everything (``all``), or the given experiments and their figures."""
    if not experiments:
        return ["all"]
    sys.path.insert(0, str(REPO / "src"))
    from ioi.registry import EXPERIMENTS, figures_of

    unknown = [name for name in experiments if name not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"--experiments: unknown {unknown}; known: {', '.join(EXPERIMENTS)}")
    targets = []
    for name in experiments:
        targets.append(f"results/{model_name}/{name}/summary.json")
        targets += [f"figures/{model_name}/{spec.name}.png" for spec in figures_of(name)]
    return targets


def run_dag(scratch: Path, config: dict, cores: int, targets: list[str]) -> float:
    """Run Snakemake in ``scratch``; returns its wall seconds. Its output goes to dag.log there."""
    config_path = scratch / "bench_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=True))
    command = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile",
               str(config_path), "--rerun-incomplete", *targets]
    # Servers of this run only (ioi.server): a model server left running by an earlier run of the
    # same model and library would serve the load job, which would then load nothing. A short
    # folder in /tmp: a Unix socket's path has at most 107 characters. Removing it stops them.
    server_dir = tempfile.mkdtemp(prefix="ioi-srv-", dir="/tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "IOI_MODEL_SERVER_DIR": server_dir}
    t0 = time.perf_counter()
    try:
        with open(scratch / "dag.log", "w") as log:
            done = subprocess.run(command, cwd=scratch, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        shutil.rmtree(server_dir, ignore_errors=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = (scratch / "dag.log").read_text()[-4000:]
        raise SystemExit(f"snakemake failed (status {done.returncode}); the end of {scratch / 'dag.log'}:\n{tail}")
    return wall


def _tsv_row(path: Path) -> dict[str, float]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    row = rows[-1]

    def number(key: str) -> float | None:
        try:
            return float(row[key])
        except (KeyError, TypeError, ValueError):
            return None

    return {"wall_s": number("s"), "max_rss_mb": number("max_rss")}


def _smk_mem_mb(smk: str, rule: str) -> float | None:
    """The ``mem_mb=`` a workflow rule declares (the first one in its block), or None."""
    text = (REPO / "workflow" / "rules" / smk).read_text()
    block = re.search(rf"^rule {rule}:\n(.*?)(?=^rule |\Z)", text, re.S | re.M)
    found = block and re.search(r"mem_mb=(\d+)", block.group(1))
    return float(found.group(1)) if found else None


def declared_mem_mb(rule: str) -> float | None:
    """The memory a job declares to the scheduler (``resources: mem_mb``): an experiment's from
    ``ioi.registry``, the self-check's and the figures' from their rules."""
    if rule.startswith("experiment:"):
        from ioi.registry import EXPERIMENTS

        spec = EXPERIMENTS.get(rule.split(":", 1)[1])
        return float(spec.mem_mb) if spec else None
    if rule in ("selfcheck", "load_model"):
        return _smk_mem_mb("model.smk", rule)
    if rule.startswith("figure:"):
        return _smk_mem_mb("figures.smk", "figure")
    return None


def rule_rows(results: Path, started_at: float | None = None) -> list[dict[str, Any]]:
    """One row per benchmarked job: ``rule`` (``load_model``, ``selfcheck``, ``experiment:<name>``,
    ``figure:<name>``, ...), wall seconds (the benchmark), own seconds (``meta.json``), overhead,
    peak RSS (MB); with ``started_at`` (the DAG's start, epoch seconds) its ``start_s``/``end_s``."""
    rows = []
    bench_dir = results / "benchmarks"
    for tsv in sorted(bench_dir.rglob("*.tsv")):
        relative = tsv.relative_to(bench_dir).with_suffix("")
        if relative.parts[0] == "figures":
            rule, meta_path = f"figure:{relative.name}", None
        elif relative.name == "selfcheck":
            rule, meta_path = "selfcheck", results / "selfcheck" / "selfcheck.json"
        elif relative.name == "load_model":
            rule, meta_path = "load_model", results / "model" / "model.json"
        elif relative.name == "comparison":
            rule, meta_path = "comparison", None
        else:
            rule, meta_path = f"experiment:{relative.name}", results / relative.name / "meta.json"
        row = {"rule": rule, **_tsv_row(tsv), "own_s": None, "overhead_s": None,
               "mem_mb": declared_mem_mb(rule)}
        if started_at is not None and row["wall_s"] is not None:
            row["end_s"] = round(tsv.stat().st_mtime - started_at, 2)
            row["start_s"] = round(row["end_s"] - row["wall_s"], 2)
        if meta_path is not None and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            row["own_s"] = meta.get("seconds")
            if meta.get("max_rss_mb") is not None:
                row["max_rss_mb"] = max(row["max_rss_mb"] or 0.0, float(meta["max_rss_mb"]))
            row["device"] = meta.get("device")
            threads = re.search(r"(\d+)threads", str(meta.get("device") or ""))
            row["threads"] = int(threads.group(1)) if threads else None
        if row["own_s"] is not None and row["wall_s"] is not None:
            row["overhead_s"] = round(row["wall_s"] - row["own_s"], 3)
        rows.append(row)
    return rows


def completeness_split(rows: list[dict[str, Any]], total_wall_s: float) -> dict[str, float | None]:
    """``completeness_wall_s``, ``rest_wall_s`` (the whole DAG minus completeness) and
    ``completeness_overlap_s``: how many seconds other jobs ran while completeness did (summed over
    them; 0 = it ran alone, so the rest's wall time is exactly the DAG's minus its own)."""
    done = next((row for row in rows if row["rule"] == "experiment:completeness"), None)
    if done is None or done["wall_s"] is None:
        return {"completeness_wall_s": None, "rest_wall_s": None, "completeness_overlap_s": None}
    overlap = None
    if "start_s" in done:
        overlap = 0.0
        for row in rows:
            if row is done or "start_s" not in row:
                continue
            overlap += max(0.0, min(row["end_s"], done["end_s"]) - max(row["start_s"], done["start_s"]))
        overlap = round(overlap, 2)
    return {"completeness_wall_s": done["wall_s"], "rest_wall_s": round(total_wall_s - done["wall_s"], 2),
            "completeness_overlap_s": overlap}


def format_table(report: dict) -> str:
    lines = [
        f"whole DAG: {report['total_wall_s']:.1f} s wall, {report['cores']} cores, "
        f"threads per job: {report['threads']}, device {report['device']}",
        *([f"everything but completeness: {report['rest_wall_s']:.1f} s wall (completeness {report['completeness_wall_s']:.1f} s; "
           f"other jobs beside it: {report['completeness_overlap_s']} s)"] if report.get("rest_wall_s") is not None else []),
        f"{'rule':44s} {'wall s':>9s} {'own s':>9s} {'overhead s':>11s} {'max RSS MB':>11s} {'mem_mb':>7s} {'threads':>7s}",
    ]

    def cell(value, width, fmt="{:.1f}"):
        return (fmt.format(value) if value is not None else "-").rjust(width)

    for row in sorted(report["rules"], key=lambda r: -(r["wall_s"] or 0)):
        lines.append(f"{row['rule']:44s} {cell(row['wall_s'], 9)} {cell(row['own_s'], 9)} "
                     f"{cell(row['overhead_s'], 11)} {cell(row['max_rss_mb'], 11, '{:.0f}')} "
                     f"{cell(row.get('mem_mb'), 7, '{:.0f}')} {cell(row.get('threads'), 7, '{:d}')}"
                     + ("  OVER" if (row.get("mem_mb") and (row["max_rss_mb"] or 0) > row["mem_mb"]) else ""))
    overheads = sorted(r["overhead_s"] for r in report["rules"] if r["overhead_s"] is not None)
    over = [r["rule"] for r in report["rules"] if r.get("mem_mb") and (r["max_rss_mb"] or 0) > r["mem_mb"]]
    lines.append(f"peak memory over the declared mem_mb: {', '.join(over) or 'none'}")
    if overheads:
        lines.append(f"per-job overhead (wall - own): median {overheads[len(overheads) // 2]:.2f} s, "
                     f"max {overheads[-1]:.2f} s over {len(overheads)} jobs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads-per-job", type=int, default=None,
                        help="torch threads per experiment job (default: the workflow's, "
                             "workflow/rules/experiments.smk: completeness every core, the rest half)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--shape", default="gpt2-small", help="checkpoint shape: gpt2-small or L{l}-H{h}-D{d}")
    parser.add_argument("--planted", action="store_true", help="the planted-circuit model instead")
    parser.add_argument("--n-scale", type=float, default=1.0, help="every N times this (>= 2)")
    parser.add_argument("--experiments", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--model-server", choices=["on", "off"], default="on",
                        help="serve the jobs from one process per model (ioi.server), or not")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="ioi-dag-"))
    prepare_scratch(scratch)
    sys.path.insert(0, str(REPO / "src"))
    if args.planted:
        model = {"model": "planted-ioi", "model_path": None, "model_name": "bench-planted-ioi"}
    else:
        checkpoint = build_checkpoint(scratch / f"checkpoint-{args.shape}-seed{args.seed}", args.shape, args.seed)
        model = {"model_path": str(checkpoint), "model_name": f"bench-random-{args.shape}-seed{args.seed}"}
    config = {**model, "device": args.device, "seed": 0, "n": scaled_n(args.n_scale),
              "model_server": args.model_server == "on"}
    if args.threads_per_job:
        config["threads_per_job"] = args.threads_per_job
    experiments = [name for name in args.experiments.split(",") if name]
    targets = targets_for(experiments, model["model_name"])
    try:
        started_at = time.time()
        total = run_dag(scratch, config, args.cores, targets)
        results = scratch / "results" / model["model_name"]
        rows = rule_rows(results, started_at)
        devices = sorted({row.pop("device") for row in rows if row.get("device")})
        from ioi.provenance import git_commit, package_versions

        report = {
            "total_wall_s": round(total, 2),
            "cores": args.cores,
            "threads": args.threads_per_job or (f"completeness {args.cores}, other experiments "
                                                f"{max(1, args.cores // 2)} (the workflow's default)"),
            **completeness_split(rows, total),
            "device": ", ".join(devices) or args.device,
            "rules": rows,
            "settings": {"config": config, "targets": targets, "n_scale": args.n_scale},
            "provenance": {"git_commit": git_commit(REPO), "packages": package_versions(),
                           "python": sys.version.split()[0], "machine_cpus": os.cpu_count()},
        }
    finally:
        if not args.keep and args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

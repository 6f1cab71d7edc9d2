"""Figure jobs drawn in their own process vs served by the plot server (``ioi.server --plots``).

Every registered figure (``ioi.registry.FIGURES``, or ``--figures a,b``) is drawn from a results
folder of a finished run (``results/<model>``, e.g. the scratch folder of ``benchmarks/dag.py
--keep``), each job in a fresh Python process as Snakemake starts it (``ioi.server.dispatch``,
the call ``workflow/scripts/plot_figure.py`` makes, without Snakemake's script preamble, which
both modes pay alike): once with ``IOI_MODEL_SERVER=0`` (imports and drawing in the job) and once
served (the first served job starts the plot server, so its start is counted), the two modes
alternating figure by figure so that a busy machine distorts both alike. Prints one row per figure
(wall seconds of each mode) and the totals, checks that both modes wrote the same PNG and PDF bytes
(``SOURCE_DATE_EPOCH`` fixed), and with ``--json FILE`` writes
``{"total_wall_s": {"alone", "served"}, "figures": [{"figure", "alone_s", "served_s",
"identical"}], ...}``.

    python benchmarks/figure_jobs.py --results <run>/results/<model> --json benchmarks/measured/figure_jobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CLIENT = """
import json, sys
from ioi.server import dispatch
dispatch("figure", **json.loads(sys.argv[1]))
"""


def job_arguments(results: Path, name: str, out: Path, log: Path) -> dict:
    from ioi.registry import FIGURES

    spec = FIGURES[name]
    base = results / spec.experiment
    return {"log": str(log), "name": name, "data_csv": str(base / "data.csv"),
            "summary_json": str(base / "summary.json"), "meta_json": str(base / "meta.json"),
            "png": str(out / f"{name}.png"), "pdf": str(out / f"{name}.pdf"),
            "extra_summary_jsons": [str(results / e / "summary.json") for e in spec.extra_experiments],
            "server_log_dir": str(log.parent / "server")}


def run_job(arguments: dict, served: bool, scratch: Path) -> float:
    env = {**os.environ, "IOI_MODEL_SERVER": "1" if served else "0", "IOI_MODEL_SERVER_DIR": str(scratch),
           "SOURCE_DATE_EPOCH": "1700000000", "PYTHONPATH": str(REPO / "src"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(arguments)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"figure {arguments['name']} failed ({'served' if served else 'alone'}):\n"
                         f"{done.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="results/<model> of a finished run")
    parser.add_argument("--figures", default="", help="comma-separated subset (default: every figure)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from ioi.registry import FIGURES
    from ioi.provenance import git_commit

    names = [n for n in args.figures.split(",") if n] or sorted(FIGURES)
    scratch = Path(tempfile.mkdtemp(prefix="ioi-figures-"))
    rows = []
    try:
        for name in names:
            walls = {}
            for mode in ("alone", "served"):
                out = scratch / mode
                walls[mode] = run_job(job_arguments(args.results.resolve(), name, out, scratch / "logs" / f"{mode}-{name}.log"),
                                      mode == "served", scratch)
            identical = all((scratch / "alone" / f"{name}.{ext}").read_bytes()
                            == (scratch / "served" / f"{name}.{ext}").read_bytes() for ext in ("png", "pdf"))
            rows.append({"figure": name, "alone_s": round(walls["alone"], 3), "served_s": round(walls["served"], 3),
                         "identical": identical})
            print(f"{name:44s} alone {walls['alone']:6.2f} s  served {walls['served']:6.2f} s  "
                  f"{'identical' if identical else 'DIFFERENT BYTES'}", flush=True)
    finally:
        for sock in scratch.glob("*.sock"):
            sock.unlink()  # the plot server stops when its socket goes
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "total_wall_s": {"alone": round(sum(r["alone_s"] for r in rows), 2),
                         "served": round(sum(r["served_s"] for r in rows), 2)},
        "n_figures": len(rows),
        "all_identical": all(r["identical"] for r in rows),
        "figures": rows,
        "provenance": {"git_commit": git_commit(REPO), "python": sys.version.split()[0],
                       "machine_cpus": os.cpu_count(), "results": str(args.results)},
    }
    print(f"{len(rows)} figure jobs: {report['total_wall_s']['alone']:.1f} s in their own processes, "
          f"{report['total_wall_s']['served']:.1f} s served (first served job starts the plot server); "
          f"bytes {'identical' if report['all_identical'] else 'DIFFER'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

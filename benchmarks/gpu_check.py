"""``make gpu-check``: everything that touches a device, on CUDA, with one table out (issue 11 item 4).

No arguments. On a machine with a CUDA GPU it runs, in order:

1. the tests that touch devices, with every test model loaded on CUDA (``IOI_TEST_DEVICE=cuda``:
   ``tests/conftest.py`` maps ``load_model(device="cpu")`` to the GPU): the fast paths against their
   references (path patching, activation patching, knockouts, the forward helpers, the analyses,
   the self-check, the planted model);
2. ``benchmarks/patching.py --device cuda`` (N = 100; the issue's target: path patching to the
   logits at N = 100 in <= 1 s);
3. ``benchmarks/dag.py --device cuda`` (the whole DAG at the paper's N on the GPT-2-shaped
   checkpoint; target <= 3 min wall);

and prints one table (step, status, seconds, what was measured), written with the raw outputs to
``benchmarks/measured/gpu_check_<card>.{txt,json}``. Without a GPU it stops at once, saying so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURED = REPO / "benchmarks" / "measured"
DEVICE_TESTS = (
    "tests/test_path_patching.py",
    "tests/test_activation_patching.py",
    "tests/test_ablation.py",
    "tests/test_forward.py",
    "tests/test_analysis.py",
    "tests/test_selfcheck.py",
    "tests/test_planted.py",
    "tests/test_models.py",
)
STEP_TIMEOUT_S = 3600


def require_cuda() -> str:
    """The card's name, or exit with status 2 and the reason when no CUDA GPU is usable."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        print(
            "make gpu-check needs a CUDA GPU, and none is visible here: torch.cuda.is_available() is "
            f"False (torch {torch.__version__}, CUDA in this build: {built}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run it on a "
            "machine with an NVIDIA GPU and a CUDA build of torch (pip install torch==2.13.0 "
            "--index-url https://download.pytorch.org/whl/cu126, then make gpu-check).",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return torch.cuda.get_device_name(0)


def _run(command: list[str], env: dict | None = None) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return done.returncode, time.perf_counter() - t0, done.stdout + done.stderr


def device_tests(out: Path) -> dict:
    junit = out / "gpu_tests.xml"
    code, seconds, text = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                f"--junitxml={junit}", *DEVICE_TESTS], env={"IOI_TEST_DEVICE": "cuda"})
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if junit.exists():
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in ET.parse(junit).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"step": "device tests on CUDA", "ok": code == 0, "seconds": round(seconds, 1),
            "measured": f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
                        f"{counts['skipped']} skipped",
            "failed": failed[:50], "tail": text[-3000:]}


def patching_benchmark(out: Path) -> dict:
    path = out / "patching_cuda.json"
    code, seconds, text = _run([sys.executable, "benchmarks/patching.py", "--device", "cuda",
                                "--json", str(path)])
    measured = ""
    if path.exists():
        rows = {row["experiment"]: row for row in json.loads(path.read_text())["rows"]}
        logits = rows.get("logits_end", {})
        measured = (f"path -> logits (END, N=100) {logits.get('seconds_fast', float('nan')):.3f} s "
                    f"(target <= 1 s); max |diff| "
                    f"{max(r['max_abs_diff'] for r in rows.values()):.1e}")
    return {"step": "benchmarks/patching.py --device cuda", "ok": code == 0, "seconds": round(seconds, 1),
            "measured": measured, "tail": text[-3000:]}


def dag_benchmark(out: Path) -> dict:
    path = out / "dag_cuda.json"
    code, seconds, text = _run([sys.executable, "benchmarks/dag.py", "--device", "cuda", "--cores",
                                str(os.cpu_count() or 1), "--json", str(path)])
    measured = ""
    if path.exists():
        report = json.loads(path.read_text())
        slowest = max(report["rules"], key=lambda r: r["wall_s"] or 0)
        overheads = [r["overhead_s"] for r in report["rules"] if r["overhead_s"] is not None]
        measured = (f"whole DAG {report['total_wall_s']:.0f} s (target <= 180 s); slowest "
                    f"{slowest['rule']} {slowest['wall_s']:.0f} s; max overhead "
                    f"{max(overheads, default=float('nan')):.1f} s")
    return {"step": "benchmarks/dag.py --device cuda", "ok": code == 0, "seconds": round(seconds, 1),
            "measured": measured, "tail": text[-3000:]}


def table(card: str, steps: list[dict]) -> str:
    lines = [f"gpu-check on {card}", "", "| step | status | seconds | measured |", "|---|---|---:|---|"]
    for step in steps:
        status = "ok" if step["ok"] else "FAILED"
        lines.append(f"| {step['step']} | {status} | {step['seconds']:.0f} | {step['measured']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    card = require_cuda()
    MEASURED.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    steps = [device_tests(MEASURED), patching_benchmark(MEASURED), dag_benchmark(MEASURED)]
    text = table(card, steps)
    print(text)
    for step in steps:
        if not step["ok"]:
            print(f"--- {step['step']} (the end of its output) ---\n{step['tail']}\n", file=sys.stderr)
    (MEASURED / f"gpu_check_{slug}.txt").write_text(text)
    (MEASURED / f"gpu_check_{slug}.json").write_text(json.dumps({"card": card, "steps": steps}, indent=2) + "\n")
    return 0 if all(step["ok"] for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())

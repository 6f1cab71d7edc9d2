"""Command line.

* ``python -m ioi check-model [--model SPEC | --configfile config/config.yaml]``
* ``python -m ioi compare --results results/gpt2-small --out paper_comparison.md``: evaluate
  ``paper_reference.yaml`` against a results folder and write the comparison table (claims whose
  results are absent say NOT RUN).

``check-model`` loads the configured model once (downloading GPT-2 small into the Hugging Face cache
when the hub is reachable) and, when the weights cannot be had, prints the one-paragraph explanation
with the ways out and exits with status 2 instead of a stack trace.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import yaml


def _configured_model(configfile: Path) -> str:
    config = yaml.safe_load(configfile.read_text()) or {}
    return str(config.get("model_path") or config.get("model", "gpt2-small"))


def check_model(spec: str) -> int:
    from ioi.models import ModelNotAvailableError, load_model

    try:
        model = load_model(spec, device="cpu")
    except ModelNotAvailableError as err:
        print(textwrap.fill(str(err), width=100), file=sys.stderr)
        return 2
    except ValueError as err:
        print(str(err), file=sys.stderr)
        return 2
    info = model.ioi_info
    print(f"ok: {spec} -> {info.source} ({info.n_layers} layers x {info.n_heads} heads)")
    return 0


GPT2_PREAMBLE = (
    "Each row is one claim of the paper (`paper_reference.yaml`: value, source, tolerance and why). "
    "GPT-2 small's weights cannot be downloaded on the machines this repository is developed on, so "
    "its rows say NOT RUN until someone runs `make figures` with network access or a local "
    "checkpoint; no GPT-2 number here is typed by hand. The offline demo's planted-circuit model is "
    "checked against its own ground truth in `results/planted-ioi/planted_comparison.md`."
)


def write_comparison(reference: Path, results: Path, out: Path, *, figures_dir: str | None = None,
                     model_label: str | None = None, title: str = "Paper comparison",
                     preamble: str | None = None) -> None:
    from ioi.comparison import (
        breakdown_tables,
        evaluate_reference,
        figure_links_by_experiment,
        render_markdown,
        selfcheck_header,
    )
    from ioi.provenance import write_text

    model = results.name
    outcomes = evaluate_reference(reference, results)
    text = render_markdown(
        outcomes,
        model_label=model_label or model,
        results_dir=f"results/{model}",
        figures_dir=figures_dir or f"figures/{model}",
        figure_links=figure_links_by_experiment(),
        title=title,
        preamble=GPT2_PREAMBLE if preamble is None and model == "gpt2-small" else (preamble or ""),
        checks=selfcheck_header(results),
    )
    text = text.rstrip("\n") + "\n\n" + breakdown_tables(results)
    write_text(out, text)
    print(f"wrote {out}: " + ", ".join(f"{o.claim_id}={o.status}" for o in outcomes[:3]) + ", ...")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ioi")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-model", help="check that the configured model can be loaded")
    group = check.add_mutually_exclusive_group()
    group.add_argument("--model", help="model spec or checkpoint path")
    group.add_argument("--configfile", type=Path, help="Snakemake config to read `model` from")
    compare = sub.add_parser("compare", help="write paper_comparison.md from a results folder")
    compare.add_argument("--reference", type=Path, default=Path("paper_reference.yaml"))
    compare.add_argument("--results", type=Path, default=Path("results/gpt2-small"))
    compare.add_argument("--figures", default=None, help="figures folder (default figures/<model>)")
    compare.add_argument("--model-label", default=None)
    compare.add_argument("--out", type=Path, default=Path("paper_comparison.md"))
    args = parser.parse_args(argv)
    if args.command == "check-model":
        spec = args.model or _configured_model(args.configfile or Path("config/config.yaml"))
        return check_model(spec)
    if args.command == "compare":
        write_comparison(args.reference, args.results, args.out,
                         figures_dir=args.figures, model_label=args.model_label)
        return 0
    return 1  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m ioi check-model [--model SPEC | --configfile config/config.yaml]``.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ioi")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-model", help="check that the configured model can be loaded")
    group = check.add_mutually_exclusive_group()
    group.add_argument("--model", help="model spec or checkpoint path")
    group.add_argument("--configfile", type=Path, help="Snakemake config to read `model` from")
    args = parser.parse_args(argv)
    if args.command == "check-model":
        spec = args.model or _configured_model(args.configfile or Path("config/config.yaml"))
        return check_model(spec)
    return 1  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

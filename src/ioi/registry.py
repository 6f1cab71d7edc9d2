"""What the workflow computes and draws: every experiment and figure, as plain data.

This module imports nothing heavy, so the Snakefile can read it at parse time. Each experiment names
the function that runs it (``module:function``), the config key of its N, and the datasets it reads;
each figure names its experiment and the function that draws it. Figure names follow the paper's
figure numbers (``fig3b_...``) or the seed notebook's analysis (``logit_lens``, ``dla_head``, ...).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    name: str
    runner: str  # "module:function" taking (model, context) -> ExperimentResult
    n_key: str  # key of config["n"]
    datasets: tuple[str, ...] = ("ioi", "abc")
    section: str = ""
    description: str = ""
    gpu: int = 1  # can use one GPU
    mem_mb: int = 4000
    runtime_min: int = 30


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    name: str
    experiment: str
    plotter: str  # "module:function" taking (frame, summary, meta) -> matplotlib Figure
    caption: str
    category: str = "Section 3"


EXPERIMENTS: dict[str, ExperimentSpec] = {}
FIGURES: dict[str, FigureSpec] = {}


def experiment(name: str, runner: str, n_key: str, **kwargs) -> ExperimentSpec:
    spec = ExperimentSpec(name=name, runner=runner, n_key=n_key, **kwargs)
    EXPERIMENTS[name] = spec
    return spec


def figure(name: str, experiment_name: str, plotter: str, caption: str, category: str) -> FigureSpec:
    spec = FigureSpec(name, experiment_name, plotter, caption, category)
    FIGURES[name] = spec
    return spec


def resolve(target: str) -> Callable:
    """Import ``"package.module:function"``."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def figures_of(experiment_name: str) -> list[FigureSpec]:
    return [spec for spec in FIGURES.values() if spec.experiment == experiment_name]


# ------------------------------------------------------------------------------------------------
# The registry: every experiment and figure of the workflow.
# ------------------------------------------------------------------------------------------------
experiment("baseline", "ioi.experiments.baseline:baseline", "baseline", section="§2, Fig. 8",
           description="LD, IO probability, S>IO rate on p_IOI and p_ABC", mem_mb=4000, runtime_min=20)
experiment("example_prompts", "ioi.experiments.baseline:example_prompts", "baseline", datasets=(),
           section="seed notebook", description="LD on the seed's 8 example prompts", runtime_min=5)

figure("logit_diff_table", "example_prompts", "ioi.plots.baseline:logit_diff_table",
       "Seed notebook: logit difference IO - S on its 8 example prompts (BOS prepended).", "Seed notebook")
figure("baseline_logit_diff", "baseline", "ioi.plots.baseline:baseline_logit_diff",
       "Paper §2: distribution of the per-prompt logit difference on p_IOI and p_ABC, per template "
       "with 95% CIs, beside the paper's 3.56.", "Section 2")

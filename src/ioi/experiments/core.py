"""Running an experiment: its context (model, datasets, circuit, settings) and its result files.

Every experiment writes three files into ``results/{model}/{experiment}/``:

* ``data.csv``: a tidy table (per prompt where meaningful, so breakdowns and CIs are free);
* ``summary.json``: the scalar and per-head quantities that figures and claims read;
* ``meta.json``: provenance (model, N, seed, templates, device, dtype, versions, git commit,
  dataset hashes, seconds taken).

All three are written atomically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ioi.circuits import Circuit, circuit_for_model
from ioi.provenance import Timer, provenance, write_csv, write_json


@dataclasses.dataclass
class ExperimentResult:
    """What an experiment hands back: a tidy frame, a JSON-able summary, extra metadata."""

    data: pd.DataFrame
    summary: dict[str, Any]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunContext:
    """Everything an experiment needs besides the model."""

    datasets: dict[str, Any]  # "ioi", "abc" -> IOIDataset
    circuit: Circuit
    seed: int = 0
    n: int = 100
    dataset_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory_budget_mb: int = 2048
    progress: bool = True
    model_label: str = ""
    greedy_runs: int | None = None  # completeness's greedy runs (config greedy_runs; None: the paper's 10)
    acdc: str | bool | None = None  # edge_circuits' ACDC: config acdc (auto | true | false; None: auto)

    def circuit_for(self, model) -> Circuit:
        """The circuit, after checking each of its heads exists in ``model``."""
        self.circuit.validate(model.cfg.n_layers, model.cfg.n_heads)
        return self.circuit

    @property
    def ioi(self):
        return self.datasets["ioi"]

    @property
    def abc(self):
        return self.datasets["abc"]


def dataset_fingerprints(datasets: dict[str, Any]) -> dict[str, Any]:
    """Hash, N, seed and templates of each dataset, for the metadata."""
    out = {}
    for key, dataset in datasets.items():
        out[key] = {
            "content_hash": dataset.content_hash(),
            "N": len(dataset),
            "seed": getattr(dataset, "seed", None),
            "prompt_type": getattr(dataset, "prompt_type", None),
            "prepend_bos": getattr(dataset, "prepend_bos", None),
            "templates": sorted(set(dataset.template_ids)),
        }
    return out


def run_and_write(
    runner,
    model,
    context: RunContext,
    out_dir: str | Path,
    *,
    experiment_name: str,
    extra_meta: dict[str, Any] | None = None,
) -> ExperimentResult:
    """Run ``runner(model, context)`` under inference mode and write data/summary/meta atomically
    (``extra_meta``: more provenance for ``meta.json``, e.g. the run's self-check)."""
    out_dir = Path(out_dir)
    with Timer() as timer, torch.inference_mode():
        result = runner(model, context)
    meta = provenance(
        model,
        experiment=experiment_name,
        N=context.n,
        seed=context.seed,
        circuit=context.circuit.name,
        datasets=dataset_fingerprints(context.datasets),
        dataset_settings=context.dataset_settings,
        seconds=round(timer.seconds, 3),
        max_rss_mb=peak_rss_mb(),
        model_label=context.model_label or None,  # the run's model name (figure titles use it)
        extra={**(extra_meta or {}), **result.meta},
    )
    write_csv(out_dir / "data.csv", result.data)
    write_json(out_dir / "summary.json", result.summary)
    write_json(out_dir / "meta.json", meta)
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB; on Linux ``ru_maxrss`` is in KB). A job run
    by the model server (:mod:`ioi.server`) is a forked child, whose peak Snakemake's benchmark
    cannot see, so every result records it here."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def default_circuit(model_spec: str) -> Circuit:
    return circuit_for_model(model_spec)


def batch_size_for(model, seq_len: int, memory_budget_mb: int) -> int:
    """Prompts per forward pass so activations + full logits stay within the memory budget."""
    cfg = model.cfg
    floats_per_prompt = seq_len * (cfg.d_vocab + 16 * cfg.d_model + cfg.n_heads * seq_len * cfg.n_layers)
    return max(1, int(memory_budget_mb * 2**20 / (4 * floats_per_prompt)))


def end_logits_batched(model, toks: torch.Tensor, end_idx: torch.Tensor, *, memory_budget_mb: int = 2048):
    """Logits at each prompt's END, ``[batch, vocab]``, in memory-bounded chunks (only END rows
    are unembedded: :func:`ioi.forward.end_logits`)."""
    from ioi.forward import end_logits

    return end_logits(model, toks, end_idx, memory_budget_mb=memory_budget_mb)

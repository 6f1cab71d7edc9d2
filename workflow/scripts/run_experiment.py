"""Run one registered experiment (see ioi.registry) and write data.csv, summary.json, meta.json.

The job is served by the model server (ioi.server: the model loaded once per run), or runs here."""

from typing import TYPE_CHECKING

from ioi.server import dispatch

if TYPE_CHECKING:
    from snakemake.script import snakemake

dispatch(
    "experiment",
    log=snakemake.log[0],
    use_server=snakemake.params.model_server,
    name=snakemake.wildcards.experiment,
    model_spec=snakemake.params.model_spec,
    model_label=snakemake.params.model_label,
    dataset_paths={kind: snakemake.input[kind] for kind in snakemake.params.dataset_kinds},
    out_dir=snakemake.params.out_dir,
    n=snakemake.params.n,
    seed=snakemake.params.seed,
    device=snakemake.params.device,
    dataset_settings=dict(snakemake.params.dataset_settings),
    memory_budget_mb=snakemake.params.memory_budget_mb,
    greedy_runs=snakemake.params.greedy_runs,
    acdc=snakemake.params.acdc,
    threads=snakemake.threads,
    selfcheck_path=snakemake.input.selfcheck,
)

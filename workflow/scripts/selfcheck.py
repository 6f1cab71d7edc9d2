"""The run's self-check (ioi.selfcheck + ioi.identity) -> results/{model}/selfcheck/selfcheck.json."""

from typing import TYPE_CHECKING

from ioi.pipeline import log_to, run_selfcheck_job

if TYPE_CHECKING:
    from snakemake.script import snakemake

with log_to(snakemake.log[0]):
    run_selfcheck_job(
        model_spec=snakemake.params.model_spec,
        model_label=snakemake.params.model_label,
        out_path=snakemake.output[0],
        seed=snakemake.params.seed,
        device=snakemake.params.device,
        dataset_settings=dict(snakemake.params.dataset_settings),
        n=snakemake.params.n,
        threads=snakemake.threads,
    )

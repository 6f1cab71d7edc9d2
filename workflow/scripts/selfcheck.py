"""The run's self-check (ioi.selfcheck + ioi.identity) -> results/{model}/selfcheck/selfcheck.json.

Runs after the load job (load_model.py), served by the model server it started (ioi.server)."""

from typing import TYPE_CHECKING

from ioi.server import dispatch

if TYPE_CHECKING:
    from snakemake.script import snakemake

dispatch(
    "selfcheck",
    log=snakemake.log[0],
    use_server=snakemake.params.model_server,
    model_spec=snakemake.params.model_spec,
    model_label=snakemake.params.model_label,
    out_path=snakemake.output[0],
    seed=snakemake.params.seed,
    device=snakemake.params.device,
    dataset_settings=dict(snakemake.params.dataset_settings),
    n=snakemake.params.n,
    threads=snakemake.threads,
)

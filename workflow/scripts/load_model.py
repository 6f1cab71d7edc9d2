"""Load the configured model once for the run (ioi.pipeline.run_load_model_job) -> results/{model}/model/model.json.

The first model job of a run: it starts the model server (ioi.server) that the self-check and the
experiments then use, or, with the server off, checks here that the model loads."""

from typing import TYPE_CHECKING

from ioi.server import dispatch

if TYPE_CHECKING:
    from snakemake.script import snakemake

dispatch(
    "load_model",
    log=snakemake.log[0],
    use_server=snakemake.params.model_server,
    model_spec=snakemake.params.model_spec,
    model_label=snakemake.params.model_label,
    out_path=snakemake.output[0],
    seed=snakemake.params.seed,
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
    threads=snakemake.threads,
)

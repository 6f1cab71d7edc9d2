"""Write one registered interactive page (see ioi.registry.PAGES) from its experiment's files.

The job is served by the plot server (ioi.server), or runs here."""

from typing import TYPE_CHECKING

from ioi.server import dispatch

if TYPE_CHECKING:
    from snakemake.script import snakemake

dispatch(
    "page",
    log=snakemake.log[0],
    use_server=snakemake.params.model_server,
    name=snakemake.wildcards.page,
    data_csv=snakemake.input.data,
    summary_json=snakemake.input.summary,
    meta_json=snakemake.input.meta,
    html=snakemake.output.html,
)

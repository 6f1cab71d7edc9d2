"""Draw one registered figure (see ioi.registry) from its experiment's files.

The job is served by the plot server (ioi.server: the plotting stack imported once per run), or
runs here."""

from typing import TYPE_CHECKING

from ioi.server import dispatch

if TYPE_CHECKING:
    from snakemake.script import snakemake

dispatch(
    "figure",
    log=snakemake.log[0],
    use_server=snakemake.params.model_server,
    name=snakemake.wildcards.figure,
    data_csv=snakemake.input.data,
    summary_json=snakemake.input.summary,
    meta_json=snakemake.input.meta,
    png=snakemake.output.png,
    pdf=snakemake.output.pdf,
    extra_summary_jsons=list(getattr(snakemake.input, "extra", [])),
)

"""Draw one registered figure (see ioi.registry) from its experiment's files."""

from typing import TYPE_CHECKING

from ioi.pipeline import log_to, plot_figure_job

if TYPE_CHECKING:
    from snakemake.script import snakemake

with log_to(snakemake.log[0]):
    plot_figure_job(
        name=snakemake.wildcards.figure,
        data_csv=snakemake.input.data,
        summary_json=snakemake.input.summary,
        meta_json=snakemake.input.meta,
        png=snakemake.output.png,
        pdf=snakemake.output.pdf,
        extra_summary_jsons=list(getattr(snakemake.input, "extra", [])),
    )

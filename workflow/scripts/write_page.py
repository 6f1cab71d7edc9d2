"""Write one registered interactive page (see ioi.registry.PAGES) from its experiment's files."""

from typing import TYPE_CHECKING

from ioi.pipeline import log_to, write_page_job

if TYPE_CHECKING:
    from snakemake.script import snakemake

with log_to(snakemake.log[0]):
    write_page_job(
        name=snakemake.wildcards.page,
        data_csv=snakemake.input.data,
        summary_json=snakemake.input.summary,
        meta_json=snakemake.input.meta,
        html=snakemake.output.html,
    )

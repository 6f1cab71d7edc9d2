"""Write p_IOI and its position-aligned p_ABC (Snakemake script; thin wrapper over ioi.data)."""

from typing import TYPE_CHECKING

from ioi.pipeline import log_to, make_datasets

if TYPE_CHECKING:
    from snakemake.script import snakemake

with log_to(snakemake.log[0]):
    make_datasets(
        n=int(snakemake.wildcards.n),
        seed=int(snakemake.wildcards.seed),
        settings=dict(snakemake.params.dataset),
        ioi_path=snakemake.output.ioi,
        abc_path=snakemake.output.abc,
        meta_path=snakemake.output.meta,
    )

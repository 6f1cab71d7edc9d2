"""Write figures/{model}/README.md, the gallery of this model's figures (ioi.gallery)."""
from typing import TYPE_CHECKING

from ioi.gallery import write_gallery
from ioi.pipeline import log_to

if TYPE_CHECKING:
    from snakemake.script import snakemake

with log_to(snakemake.log[0]):
    write_gallery(
        snakemake.output[0],
        model_label=snakemake.params.model,
        results_dir=snakemake.params.results,
        paper_reference=snakemake.input.paper_reference,
        model_reference=snakemake.input.model_reference,
    )
    print(f"wrote {snakemake.output[0]}")

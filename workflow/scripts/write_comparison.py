"""Write the claim-by-claim comparison table for this model's results."""
from pathlib import Path
from typing import TYPE_CHECKING

from ioi.__main__ import write_comparison
from ioi.pipeline import log_to

if TYPE_CHECKING:
    from snakemake.script import snakemake

with log_to(snakemake.log[0]):
    for out in snakemake.output:
        write_comparison(
            Path(snakemake.input.reference),
            Path(snakemake.params.results),
            Path(out),
            figures_dir=("" if out == "paper_comparison.md" else "../../") + snakemake.params.figures,
            model_label=snakemake.params.model,
        )

"""ioi: a replication of "Interpretability in the Wild" (Wang et al., 2022) on TransformerLens 4."""

__version__ = "0.1.0"

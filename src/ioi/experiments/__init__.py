"""Experiments behind every figure and table (one module per family)."""

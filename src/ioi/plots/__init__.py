"""Figures: one function per figure, reading an experiment's data/summary/meta."""

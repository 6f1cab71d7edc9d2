"""IOI prompt datasets: the paper's word lists and templates, seeded generation, corruptions.

Modules: ``words`` (verbatim data), ``templates`` (template sets, distinct-prompt counts),
``prompt`` (one filled template), ``tokens`` (tokenisation and ``word_idx`` positions),
``generation`` (seeded sampling), ``flips`` (corruptions), ``persistence`` (files, hashes),
``dataset`` (``IOIDataset``).
"""

from ioi.data.dataset import DatasetSettings, IOIDataset, check_aligned, make_abc
from ioi.data.flips import ABC_CHAIN, TUPLE_FLIPS, PatternFlip, TupleFlip, parse_flip
from ioi.data.prompt import Prompt
from ioi.data.templates import Template, count_distinct_prompts, resolve_templates
from ioi.data.tokens import WORD_IDX_ALIASES, WORD_IDX_KEYS, WordIdx
from ioi.data.words import (
    ABBA_TEMPLATES,
    ANIMALS,
    BABA_TEMPLATES,
    NAMES,
    OBJECTS,
    PAPER_TEMPLATES_PER_FORM,
    PLACES,
    TEMPLATE_IDS,
    TEMPLATES_BY_ID,
)

__all__ = [
    "ABBA_TEMPLATES",
    "ABC_CHAIN",
    "ANIMALS",
    "BABA_TEMPLATES",
    "DatasetSettings",
    "IOIDataset",
    "NAMES",
    "OBJECTS",
    "PAPER_TEMPLATES_PER_FORM",
    "PLACES",
    "PatternFlip",
    "Prompt",
    "TEMPLATES_BY_ID",
    "TEMPLATE_IDS",
    "TUPLE_FLIPS",
    "Template",
    "TupleFlip",
    "WORD_IDX_ALIASES",
    "WORD_IDX_KEYS",
    "WordIdx",
    "check_aligned",
    "count_distinct_prompts",
    "make_abc",
    "parse_flip",
    "resolve_templates",
]

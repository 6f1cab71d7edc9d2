"""Are these GPT-2 small's weights? An identity check before any paper comparison (issue 10 §5).

ARENA's IOI notebook publishes GPT-2 small's logit difference ``logit(correct) - logit(incorrect)``
on the seed notebook's 8 hand-written prompts, BOS prepended, read at the last token
(``../shared/reference/peers.md`` §4.2): 3.337, 3.202, 2.709, 3.797, 1.720, 5.281, 2.601, 5.767
(mean 3.552). These numbers do not depend on ``fold_ln`` / centring / ``fold_value_biases``
(logit differences are invariant to them up to float error), so a run whose weights are GPT-2
small, processed correctly, reproduces each to well within ±0.01.

A run that is to be compared with the paper -- the results folder is named ``gpt2-small``, the
spec is a GPT-2 small alias, or a local checkpoint folder is named ``gpt2`` / ``gpt2-small`` --
must pass this check first. If it does not, ``paper_comparison.md`` says the weights are not GPT-2
small (or are processed differently) and withholds every verdict, and the tolerance tests
(``tests/replication``) skip with that reason (:func:`ioi.comparison.withheld_reason`).
Other runs (the planted model, random weights) record the check as not applicable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ioi.models import GPT2_SMALL_ALIASES

# ARENA's published per-prompt logit differences for GPT-2 small on the seed's 8 prompts (BOS on).
ARENA_SEED_PROMPT_LOGIT_DIFFS = (3.337, 3.202, 2.709, 3.797, 1.720, 5.281, 2.601, 5.767)
ARENA_SEED_PROMPT_MEAN = 3.552
IDENTITY_TOLERANCE = 0.01
PAPER_MODEL_NAMES = ("gpt2-small", "gpt2")


def claims_to_be_gpt2_small(model_label: str, model_spec: str | Path) -> bool:
    """Whether a run is to be compared with the paper as GPT-2 small: its results folder is
    ``gpt2-small``, its spec a GPT-2 small alias, or its local checkpoint folder is named
    ``gpt2`` / ``gpt2-small``."""
    spec = str(model_spec)
    if model_label in PAPER_MODEL_NAMES or spec in GPT2_SMALL_ALIASES:
        return True
    path = Path(spec).expanduser()
    return path.is_dir() and path.name in PAPER_MODEL_NAMES


@torch.no_grad()
def seed_prompt_logit_diffs(model) -> list[float]:
    """The logit difference on each of the seed notebook's 8 prompts, BOS prepended, at the last
    token (one unpadded forward per prompt, as the notebook does)."""
    from ioi.experiments.baseline import seed_prompt_logits, seed_prompts

    _, answers = seed_prompts()
    tokenizer = model.tokenizer
    values = []
    for (correct, incorrect), logits in zip(answers, seed_prompt_logits(model)):
        correct_id = tokenizer(correct).input_ids[0]
        incorrect_id = tokenizer(incorrect).input_ids[0]
        values.append(float(logits[correct_id] - logits[incorrect_id]))
    return values


def identity_check(model, *, model_label: str, model_spec: str | Path,
                   tolerance: float = IDENTITY_TOLERANCE) -> dict[str, Any]:
    """The identity record written into ``selfcheck.json``: ``applicable`` (the run claims to be
    GPT-2 small), ``passed`` (``None`` when not applicable), our 8 values, ARENA's, the largest
    absolute difference and, when it fails, the ``reason`` the comparison quotes."""
    ours = seed_prompt_logit_diffs(model)
    diffs = [abs(a - b) for a, b in zip(ours, ARENA_SEED_PROMPT_LOGIT_DIFFS)]
    applicable = claims_to_be_gpt2_small(model_label, model_spec)
    max_diff = max(diffs)
    passed = (max_diff <= tolerance) if applicable else None
    record: dict[str, Any] = {
        "applicable": applicable,
        "passed": passed,
        "tolerance": tolerance,
        "expected": list(ARENA_SEED_PROMPT_LOGIT_DIFFS),
        "expected_mean": ARENA_SEED_PROMPT_MEAN,
        "ours": [round(v, 6) for v in ours],
        "ours_mean": round(sum(ours) / len(ours), 6),
        "max_abs_diff": max_diff,
        "source": "ARENA IOI notebook, the seed's 8 example prompts, BOS on (peers.md §4.2)",
    }
    if applicable and not passed:
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        record["reason"] = (
            f"the weights are not GPT-2 small (or are processed differently): on the seed's 8 "
            f"example prompts (BOS on) our logit differences differ from ARENA's published GPT-2 "
            f"small values by up to {max_diff:.3g} (prompt {worst + 1}: ours {ours[worst]:.3f}, "
            f"ARENA {ARENA_SEED_PROMPT_LOGIT_DIFFS[worst]:.3f}; tolerance ±{tolerance})"
        )
    elif not applicable:
        record["reason"] = "not applicable: this run is not compared with the paper as GPT-2 small"
    return record

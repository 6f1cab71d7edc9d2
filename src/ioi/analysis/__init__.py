"""Analyses of a model's IOI behaviour, all read at each prompt's own positions (padded batches).

* :mod:`~ioi.analysis.logit_attribution`: answer directions, logit lens, per-layer and per-head
  direct logit attribution at END;
* :mod:`~ioi.analysis.attention`: attention probabilities between per-prompt positions, top heads;
* :mod:`~ioi.analysis.copy_scores`: (negative) copy scores of every head (paper §3.1);
* :mod:`~ioi.analysis.repeated_tokens`: previous-token / duplicate / induction / next-token scores
  on repeated random tokens (paper App. H/I);
* :mod:`~ioi.analysis.scatter`: attention vs. name-direction write of a head (Fig. 3c / 16).
"""

from ioi.analysis.attention import attention_to_positions, top_heads
from ioi.analysis.copy_scores import (
    arena_copy_inputs,
    check_value_biases,
    copy_score_definition,
    copy_score_hits,
    copy_scores,
    copy_scores_both_signs,
    copy_scores_from_resid,
    paper_copy_inputs,
    score_grid,
)
from ioi.analysis.logit_attribution import (
    answer_residual_directions,
    dla_attn_bias,
    dla_per_head,
    dla_per_layer,
    logit_lens,
)
from ioi.analysis.repeated_tokens import generate_repeated_tokens, head_scores
from ioi.analysis.scatter import attention_projection_frame, scatter_correlations

__all__ = [
    "answer_residual_directions",
    "logit_lens",
    "dla_per_layer",
    "dla_per_head",
    "dla_attn_bias",
    "attention_to_positions",
    "top_heads",
    "copy_scores",
    "copy_scores_both_signs",
    "copy_scores_from_resid",
    "copy_score_hits",
    "score_grid",
    "paper_copy_inputs",
    "arena_copy_inputs",
    "check_value_biases",
    "copy_score_definition",
    "generate_repeated_tokens",
    "head_scores",
    "attention_projection_frame",
    "scatter_correlations",
]

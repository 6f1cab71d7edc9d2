"""Model performance on p_IOI and p_ABC (paper §2, Fig. 8 first row) and the seed's example prompts.

Per prompt, at its own END: logit difference ``logit(IO) - logit(S)``, IO and S probabilities, and
whether S's logit beats IO's. p_ABC rows are scored with the *IOI* prompt's IO and S tokens (the
baseline that path patching and activation patching normalise against).
"""

from __future__ import annotations

import pandas as pd
import torch

from ioi.experiments.core import ExperimentResult, RunContext, end_logits_batched

# The seed notebook's 8 prompts (4 templates x both answers) and their (correct, incorrect) answers.
SEED_PROMPT_FORMATS = (
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
)
SEED_NAME_PAIRS = ((" John", " Mary"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy"))


def seed_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """The seed's prompts: each format with S2 = each name; the answer is the other name."""
    prompts, answers = [], []
    for fmt, names in zip(SEED_PROMPT_FORMATS, SEED_NAME_PAIRS):
        for subject, other in (names[::-1], names):
            prompts.append(fmt.format(subject))
            answers.append((other, subject))
    return prompts, answers


@torch.no_grad()
def seed_prompt_logits(model) -> torch.Tensor:
    """``[prompt, vocab]`` last-token logits (float32, on the CPU) of :func:`seed_prompts`, BOS
    prepended, one unpadded forward per prompt (as the notebook does; only the last position is
    unembedded: :func:`ioi.forward.end_logits`)."""
    from ioi.forward import end_logits

    prompts, _ = seed_prompts()
    tokenizer = model.tokenizer
    last = []
    for prompt in prompts:
        toks = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt).input_ids], device="cpu")
        last.append(end_logits(model, toks, torch.tensor([toks.shape[1] - 1], device="cpu"))[0])
    return torch.stack(last)


def per_prompt_scores(end_logits: torch.Tensor, io_ids: torch.Tensor, s_ids: torch.Tensor) -> pd.DataFrame:
    rows = torch.arange(len(io_ids), device=end_logits.device)
    probs = end_logits.softmax(-1)
    ld = end_logits[rows, io_ids] - end_logits[rows, s_ids]
    return pd.DataFrame(
        {
            "logit_diff": ld.numpy(),
            "io_prob": probs[rows, io_ids].numpy(),
            "s_prob": probs[rows, s_ids].numpy(),
            "s_over_io": (ld < 0).numpy(),
        }
    )


def _dataset_frame(model, dataset, io_ids, s_ids, ctx: RunContext, name: str) -> pd.DataFrame:
    logits = end_logits_batched(model, dataset.toks, dataset.word_idx["END"],
                                memory_budget_mb=ctx.memory_budget_mb)
    frame = per_prompt_scores(logits, io_ids, s_ids)
    frame.insert(0, "dataset", name)
    frame.insert(1, "prompt", range(len(frame)))
    frame.insert(2, "template", list(dataset.template_ids))
    frame.insert(3, "sentence", list(dataset.sentences))
    return frame


def baseline(model, ctx: RunContext) -> ExperimentResult:
    """LD, IO probability and S>IO rate on p_IOI (and p_ABC, scored with the IOI answers)."""
    io_ids, s_ids = ctx.ioi.io_token_ids, ctx.ioi.s_token_ids
    frame = pd.concat(
        [
            _dataset_frame(model, ctx.ioi, io_ids, s_ids, ctx, "ioi"),
            _dataset_frame(model, ctx.abc, io_ids, s_ids, ctx, "abc"),
        ],
        ignore_index=True,
    )
    ioi_rows = frame[frame.dataset == "ioi"]
    summary = {
        "logit_diff_mean": float(ioi_rows.logit_diff.mean()),
        "logit_diff_std": float(ioi_rows.logit_diff.std()),
        "io_prob_mean": float(ioi_rows.io_prob.mean()),
        "s_over_io_rate": float(ioi_rows.s_over_io.mean()),
        "io_over_s_rate": float(1 - ioi_rows.s_over_io.mean()),
        "abc_logit_diff_mean": float(frame[frame.dataset == "abc"].logit_diff.mean()),
        "per_template_logit_diff": ioi_rows.groupby("template").logit_diff.mean().to_dict(),
        "breakdown": _breakdown(ioi_rows, ctx),
    }
    return ExperimentResult(frame, summary)


def _breakdown(ioi_rows: pd.DataFrame, ctx: RunContext) -> dict:
    """LD and IO probability on p_IOI per template and per order (ioi.breakdown)."""
    from ioi.breakdown import breakdown_mean, group_labels

    labels = group_labels(ctx.ioi)
    return {
        "logit_diff": breakdown_mean(ioi_rows.logit_diff.to_numpy(), labels, seed=ctx.seed,
                                     definition="mean logit(IO) - logit(S) at END over the group"),
        "io_prob": breakdown_mean(ioi_rows.io_prob.to_numpy(), labels, seed=ctx.seed,
                                  definition="mean IO probability at END over the group"),
    }


def example_prompts(model, ctx: RunContext) -> ExperimentResult:
    """The seed notebook's logit-difference table on its 8 hand-written prompts (BOS prepended,
    as the notebook does), read at the last token (these prompts are not padded: one per forward)."""
    prompts, answers = seed_prompts()
    tokenizer = model.tokenizer
    rows = []
    for prompt, (correct, incorrect), logits in zip(prompts, answers, seed_prompt_logits(model)):
        correct_id = tokenizer(correct).input_ids[0]
        incorrect_id = tokenizer(incorrect).input_ids[0]
        rows.append(
            {
                "prompt": prompt,
                "correct": correct,
                "incorrect": incorrect,
                "logit_diff": float(logits[correct_id] - logits[incorrect_id]),
                "correct_prob": float(logits.softmax(-1)[correct_id]),
            }
        )
    frame = pd.DataFrame(rows)
    summary = {"logit_diff_mean": float(frame.logit_diff.mean()),
               "per_prompt_logit_diff": frame.logit_diff.tolist()}
    return ExperimentResult(frame, summary, meta={"prepend_bos": True})

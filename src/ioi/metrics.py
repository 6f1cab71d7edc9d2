"""Task metrics, read at each prompt's own END position (never ``[:, -1]`` on padded batches).

Definitions (paper §2, the paper code's ``logit_diff``/``probs``, the seed notebook's metrics):

* logit difference ``LD_i = logits[i, END_i, IO_i] - logits[i, END_i, S_i]`` (raw, not normalised);
* IO probability ``softmax(logits[i, END_i])[IO_i]``;
* S-over-IO rate: the fraction of prompts with ``LD_i < 0``;
* the seed's two normalisations of a mean LD: ``(LD - LD_corrupt) / (LD_clean - LD_corrupt)``
  (0 = corrupted, 1 = clean: activation patching) and ``(LD - LD_clean) / (LD_clean - LD_corrupt)``
  (0 = clean, -1 = corrupted: path patching);
* the paper code's "% change in logit difference" ``100 * (LD - LD_clean) / LD_clean``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

Normalisation = Literal["none", "clean_is_one", "clean_is_zero", "percent_change"]
NORMALISATIONS: tuple[str, ...] = ("none", "clean_is_one", "clean_is_zero", "percent_change")


def _check_end_positions(logits: Tensor, end_idx: Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"Expected logits [batch, seq, vocab], got shape {tuple(logits.shape)}.")
    if end_idx.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{end_idx.shape[0]} END positions for a batch of {logits.shape[0]} prompts: pass the "
            "dataset (or slice) the logits were computed on."
        )
    if int(end_idx.max()) >= logits.shape[1]:
        raise ValueError(
            f"END position {int(end_idx.max())} is outside the {logits.shape[1]} sequence positions."
        )


def end_logits(
    logits: Float[Tensor, "batch seq vocab"], end_idx: Int[Tensor, "batch"]
) -> Float[Tensor, "batch vocab"]:
    """The logits at each prompt's own END position."""
    _check_end_positions(logits, end_idx)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, end_idx.to(logits.device)]


def logit_diff_from_end_logits(
    end_logits: Float[Tensor, "batch vocab"],
    io_ids: Int[Tensor, "batch"],
    s_ids: Int[Tensor, "batch"],
) -> Float[Tensor, "batch"]:
    """Per-prompt ``logit(IO) - logit(S)`` from logits already taken at END."""
    io = end_logits.gather(-1, io_ids.to(end_logits.device)[:, None])[:, 0]
    s = end_logits.gather(-1, s_ids.to(end_logits.device)[:, None])[:, 0]
    return io - s


def logit_diff(
    logits: Float[Tensor, "batch seq vocab"],
    end_idx: Int[Tensor, "batch"],
    io_ids: Int[Tensor, "batch"],
    s_ids: Int[Tensor, "batch"],
    per_prompt: bool = False,
) -> Float[Tensor, "*batch"]:
    """Logit difference IO - S at each prompt's END; the mean unless ``per_prompt``."""
    diffs = logit_diff_from_end_logits(end_logits(logits, end_idx), io_ids, s_ids)
    return diffs if per_prompt else diffs.mean()


def io_probability(
    logits: Float[Tensor, "batch seq vocab"],
    end_idx: Int[Tensor, "batch"],
    io_ids: Int[Tensor, "batch"],
    per_prompt: bool = False,
) -> Float[Tensor, "*batch"]:
    """Softmax probability of the IO token at each prompt's END; the mean unless ``per_prompt``."""
    probs = end_logits(logits, end_idx).float().softmax(-1)
    io = probs.gather(-1, io_ids.to(probs.device)[:, None])[:, 0]
    return io if per_prompt else io.mean()


def s_over_io_rate(per_prompt_logit_diff: Float[Tensor, "batch"]) -> float:
    """Fraction of prompts where S's logit exceeds IO's (the paper's 'S logit greater than IO')."""
    return float((per_prompt_logit_diff < 0).float().mean())


def normalise_clean_is_one(ld: Tensor | float, clean: float, corrupted: float) -> Tensor | float:
    """Seed's ``ioi_metric``: 0 when LD equals the corrupted LD, 1 when it equals the clean LD."""
    _check_baselines(clean, corrupted)
    return (ld - corrupted) / (clean - corrupted)


def normalise_clean_is_zero(ld: Tensor | float, clean: float, corrupted: float) -> Tensor | float:
    """Seed's ``ioi_metric_2``: 0 when LD equals the clean LD, -1 when it equals the corrupted LD."""
    _check_baselines(clean, corrupted)
    return (ld - clean) / (clean - corrupted)


def percent_change(ld: Tensor | float, clean: float) -> Tensor | float:
    """The paper code's '% change in logit difference': ``100 * (LD - clean) / clean``."""
    if clean == 0:
        raise ValueError("The clean logit difference is 0: a % change relative to it is undefined.")
    return 100.0 * (ld - clean) / clean


def _check_baselines(clean: float, corrupted: float) -> None:
    if clean == corrupted:
        raise ValueError(
            f"Clean and corrupted logit differences are equal ({clean:.4g}): normalising by their "
            "difference is undefined; use normalisation='none'."
        )


@dataclasses.dataclass
class LogitDiff:
    """Mean (or per-prompt) logit difference at each prompt's END, optionally normalised.

    Callable on full logits ``[batch, seq, vocab]``. Its parts are exposed so fast paths can compute
    only what they need: ``end_idx`` (where to read), ``io_ids``/``s_ids`` (which two logits),
    :meth:`from_end_logits` (logits already at END) and :meth:`from_answer_logits` (just the two
    logits per prompt), :meth:`reduce` (mean + normalisation of per-prompt values).

    ``normalisation``: ``"none"`` (raw LD), ``"clean_is_one"``, ``"clean_is_zero"`` or
    ``"percent_change"`` (see the module docstring); the last three need ``clean`` (and the first
    two ``corrupted``) baselines, which :meth:`with_baselines` fills in.
    """

    end_idx: Int[Tensor, "batch"]
    io_ids: Int[Tensor, "batch"]
    s_ids: Int[Tensor, "batch"]
    normalisation: Normalisation = "none"
    clean: float | None = None
    corrupted: float | None = None
    per_prompt: bool = False

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"Unknown normalisation {self.normalisation!r}; choose from {NORMALISATIONS}."
            )
        if not (len(self.end_idx) == len(self.io_ids) == len(self.s_ids)):
            raise ValueError("end_idx, io_ids and s_ids must have one entry per prompt.")
        if self.normalisation != "none" and self.clean is None:
            raise ValueError(f"normalisation={self.normalisation!r} needs the clean baseline LD.")
        if self.normalisation in ("clean_is_one", "clean_is_zero") and self.corrupted is None:
            raise ValueError(f"normalisation={self.normalisation!r} needs the corrupted baseline LD.")

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> "LogitDiff":
        """Read END, IO and S from an :class:`ioi.data.IOIDataset` (or anything with those fields)."""
        return cls(
            end_idx=dataset.word_idx["END"],
            io_ids=dataset.io_token_ids,
            s_ids=dataset.s_token_ids,
            **kwargs,
        )

    def with_baselines(
        self, clean: float, corrupted: float | None = None, normalisation: Normalisation | None = None
    ) -> "LogitDiff":
        """A copy with baselines (and optionally a new normalisation) set."""
        return dataclasses.replace(
            self,
            clean=float(clean),
            corrupted=None if corrupted is None else float(corrupted),
            normalisation=normalisation or self.normalisation,
        )

    def raw(self) -> "LogitDiff":
        """The same metric without normalisation, per prompt."""
        return dataclasses.replace(self, normalisation="none", per_prompt=True)

    def __len__(self) -> int:
        return len(self.end_idx)

    def __getitem__(self, rows) -> "LogitDiff":
        """The metric restricted to a subset of prompts (baselines kept)."""
        return dataclasses.replace(
            self, end_idx=self.end_idx[rows], io_ids=self.io_ids[rows], s_ids=self.s_ids[rows]
        )

    def reduce(self, per_prompt_ld: Float[Tensor, "*k batch"]) -> Float[Tensor, "*k"] | Tensor:
        """Mean over the last (prompt) axis, then the normalisation; per-prompt if asked."""
        values = per_prompt_ld if self.per_prompt else per_prompt_ld.mean(-1)
        if self.normalisation == "none":
            return values
        if self.normalisation == "clean_is_one":
            return normalise_clean_is_one(values, self.clean, self.corrupted)
        if self.normalisation == "clean_is_zero":
            return normalise_clean_is_zero(values, self.clean, self.corrupted)
        return percent_change(values, self.clean)

    def from_answer_logits(
        self, io_logits: Float[Tensor, "*k batch"], s_logits: Float[Tensor, "*k batch"]
    ) -> Tensor:
        return self.reduce(io_logits - s_logits)

    def from_end_logits(self, end_logits_: Float[Tensor, "*k batch vocab"]) -> Tensor:
        rows = torch.arange(len(self), device=end_logits_.device)
        io = end_logits_[..., rows, self.io_ids.to(end_logits_.device)]
        s = end_logits_[..., rows, self.s_ids.to(end_logits_.device)]
        return self.from_answer_logits(io, s)

    def per_prompt_logit_diff(self, logits: Float[Tensor, "batch seq vocab"]) -> Float[Tensor, "batch"]:
        return logit_diff(logits, self.end_idx, self.io_ids, self.s_ids, per_prompt=True)

    def __call__(self, logits: Float[Tensor, "batch seq vocab"]) -> Tensor:
        return self.reduce(self.per_prompt_logit_diff(logits))

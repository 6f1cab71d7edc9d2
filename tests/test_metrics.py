"""Metrics read each prompt's own END, and the normalisations hit their anchor points exactly."""

from __future__ import annotations

import pytest
import torch

from ioi.metrics import (
    LogitDiff,
    end_logits,
    io_probability,
    logit_diff,
    normalise_clean_is_one,
    normalise_clean_is_zero,
    percent_change,
    s_over_io_rate,
)

EXACT = dict(atol=1e-6, rtol=0)


@pytest.fixture
def padded_logits():
    """3 prompts, 5 positions, vocab 7; END differs per prompt and later rows are 'padding'."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator)
    end = torch.tensor([2, 4, 1])
    io = torch.tensor([3, 0, 6])
    s = torch.tensor([1, 5, 2])
    return logits, end, io, s


def test_logit_diff_reads_each_prompts_end(padded_logits):
    logits, end, io, s = padded_logits
    expected = torch.stack([logits[i, end[i], io[i]] - logits[i, end[i], s[i]] for i in range(3)])
    torch.testing.assert_close(logit_diff(logits, end, io, s, per_prompt=True), expected, **EXACT)
    torch.testing.assert_close(logit_diff(logits, end, io, s), expected.mean(), **EXACT)
    # Reading the last position instead would be wrong on this padded batch.
    last = logits[:, -1].gather(-1, io[:, None])[:, 0] - logits[:, -1].gather(-1, s[:, None])[:, 0]
    assert not torch.allclose(last, expected)


def test_io_probability_and_s_over_io(padded_logits):
    logits, end, io, s = padded_logits
    probs = torch.stack([logits[i, end[i]].softmax(-1)[io[i]] for i in range(3)])
    torch.testing.assert_close(io_probability(logits, end, io, per_prompt=True), probs, **EXACT)
    assert s_over_io_rate(torch.tensor([1.0, -0.5, 2.0, -3.0])) == 0.5


def test_normalisations_hit_anchor_points():
    clean, corrupted = 3.0, -0.5
    assert normalise_clean_is_one(clean, clean, corrupted) == 1.0
    assert normalise_clean_is_one(corrupted, clean, corrupted) == 0.0
    assert normalise_clean_is_zero(clean, clean, corrupted) == 0.0
    assert normalise_clean_is_zero(corrupted, clean, corrupted) == -1.0
    assert percent_change(1.5, clean) == -50.0
    with pytest.raises(ValueError, match="undefined"):
        normalise_clean_is_one(1.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="clean logit difference is 0"):
        percent_change(1.0, 0.0)


def test_logit_diff_object_parts_agree(padded_logits):
    logits, end, io, s = padded_logits
    metric = LogitDiff(end, io, s)
    full = metric(logits)
    at_end = end_logits(logits, end)
    torch.testing.assert_close(metric.from_end_logits(at_end), full, **EXACT)
    rows = torch.arange(3)
    torch.testing.assert_close(
        metric.from_answer_logits(at_end[rows, io], at_end[rows, s]), full, **EXACT
    )
    # Leading "patch" axes are reduced over the prompt axis only.
    stacked = torch.stack([at_end, at_end * 2])
    torch.testing.assert_close(metric.from_end_logits(stacked), torch.stack([full, 2 * full]), **EXACT)
    # Sub-selection keeps the semantics.
    torch.testing.assert_close(metric[1:](logits[1:]), logit_diff(logits[1:], end[1:], io[1:], s[1:]), **EXACT)


def test_logit_diff_object_normalisations(padded_logits):
    logits, end, io, s = padded_logits
    raw = LogitDiff(end, io, s)
    clean = float(raw(logits))
    corrupted = clean - 2.0
    one = raw.with_baselines(clean, corrupted, normalisation="clean_is_one")
    zero = raw.with_baselines(clean, corrupted, normalisation="clean_is_zero")
    pct = raw.with_baselines(clean, normalisation="percent_change")
    assert float(one(logits)) == pytest.approx(1.0)
    assert float(zero(logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(pct(logits)) == pytest.approx(0.0, abs=1e-4)
    per_prompt = LogitDiff(end, io, s, per_prompt=True)
    assert per_prompt(logits).shape == (3,)


def test_logit_diff_object_validates():
    end, io, s = torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([2, 3])
    with pytest.raises(ValueError, match="Unknown normalisation"):
        LogitDiff(end, io, s, normalisation="zscore")
    with pytest.raises(ValueError, match="needs the clean baseline"):
        LogitDiff(end, io, s, normalisation="percent_change")
    with pytest.raises(ValueError, match="corrupted baseline"):
        LogitDiff(end, io, s, normalisation="clean_is_one", clean=1.0)
    with pytest.raises(ValueError, match="one entry per prompt"):
        LogitDiff(end, io[:1], s)
    with pytest.raises(ValueError, match="outside"):
        LogitDiff(end, io, s)(torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="END positions for a batch"):
        LogitDiff(end, io, s)(torch.zeros(3, 4, 5))

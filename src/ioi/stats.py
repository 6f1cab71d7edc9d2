"""Uncertainty the paper does not give: bootstrap confidence intervals over prompts."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(
    values, *, statistic=np.mean, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over the first axis of ``values`` (prompts).

    The mean of 1-D values is taken over all resamples at once (``data[idx].mean(1)``: the same
    pairwise sums as ``np.mean`` of each resample, so the same numbers; tested)."""
    data = np.asarray(values, dtype=float)
    if data.shape[0] < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.shape[0], size=(n_resamples, data.shape[0]))
    if statistic is np.mean and data.ndim == 1:
        stats = data[idx].mean(1)
    else:
        stats = np.array([statistic(data[row]) for row in idx])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_ratio_ci(
    numerator, denominator, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """CI of ``mean(numerator) / mean(denominator)`` resampling prompts jointly (paired)."""
    num = np.asarray(numerator, dtype=float)
    den = np.asarray(denominator, dtype=float)
    if num.shape != den.shape or num.shape[0] < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.shape[0], size=(n_resamples, num.shape[0]))
    ratios = num[idx].mean(1) / den[idx].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha])
    return float(low), float(high)

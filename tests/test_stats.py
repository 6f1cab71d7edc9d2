"""ioi.stats: the vectorised bootstrap of the mean equals the per-resample loop exactly."""

import numpy as np
import pytest

from ioi.stats import bootstrap_ci


@pytest.mark.parametrize("n", [2, 7, 100, 1000])
def test_vectorised_mean_bootstrap_equals_the_loop(n):
    values = np.random.default_rng(n).normal(size=n) * 10.0 ** np.random.default_rng(1).integers(-3, 4, size=n)
    fast = bootstrap_ci(values, seed=3)
    loop = bootstrap_ci(values, statistic=lambda x: np.mean(x), seed=3)  # not np.mean itself: the loop
    assert fast == loop
    assert bootstrap_ci(values[:1]) != bootstrap_ci(values[:1])  # NaN for fewer than 2 prompts

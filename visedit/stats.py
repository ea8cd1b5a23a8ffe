"""Statistics shared by attribution and evaluation."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """Mean and percentile bootstrap interval over axis 0 of ``values`` (n, …)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(1)
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100], axis=0)
    return values.mean(0), lo, hi

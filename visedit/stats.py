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


def ranks(x) -> np.ndarray:
    """Ranks 0…n−1 of the values of ``x`` (flattened), ties sharing their average rank."""
    x = np.asarray(x, dtype=float).ravel()
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=r) / counts)[inverse]


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two equally long arrays (ties get their average rank). NaN when
    ``a`` is constant (nothing to compare with); 0 when only ``b`` is."""
    ra, rb = ranks(a), ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"rank_correlation needs arrays of one length, got {len(ra)} and {len(rb)}")
    if ra.std() == 0:
        return float("nan")
    if rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])

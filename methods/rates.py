"""Layer-wise rates whose parameter-weighted mean must equal the target exactly, within bounds: the one
repair shared by every allocator that proposes uneven rates (loss-estimate levels, searched rates)."""
from __future__ import annotations

import numpy as np


def shift_to_mean(values, weights, target: float, low: float, high: float) -> np.ndarray:
    """clip(values + s, low, high), with the one shift s that makes sum(weights * rates) / sum(weights)
    equal `target` (needs low <= target <= high).

    The weighted mean of clip(values + s) is continuous and non-decreasing in s, from `low` to `high`:
    bisection finds s, then the entries left strictly inside the bounds absorb the last residual, so the
    mean is exact to float precision and the bounds always hold."""
    values = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    lo, hi = low - values.max(), high - values.min()
    for _ in range(200):
        mid = (lo + hi) / 2
        if w @ np.clip(values + mid, low, high) < target:
            lo = mid
        else:
            hi = mid
    shifted = np.clip(values + (lo + hi) / 2, low, high)
    free = (shifted > low) & (shifted < high)
    if free.any():
        shifted[free] += (target - w @ shifted) / w[free].sum()
        shifted = np.clip(shifted, low, high)
    return shifted

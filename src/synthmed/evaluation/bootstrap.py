"""Bootstrap confidence intervals for any aggregate, per-image or set-level.

Two interval methods:
- "percentile" (default): the 2.5% and 97.5% quantiles of the resampled statistic. Right for
  means of per-image scores (Dice, SSIM, accuracy), whose bootstrap distribution is centred on
  the estimate.
- "bias_corrected": the percentile interval shifted by the bootstrap's bias estimate
  (mean of the resamples - estimate; Efron & Tibshirani 1993 ch. 10), for statistics with a
  sample-size bias, FID above all: resampling with replacement repeats rows, which shrinks the
  effective sample and inflates FID, so the plain percentile interval sits above the estimate,
  often entirely (at N close to the feature dimension by more than its own width, where the
  reverse-percentile "basic" interval overshoots below it). The shift keeps the resamples'
  spread and moves their centre onto the estimate. `lower_bound` clips it at a statistic's
  floor (FID >= 0).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_ci(
    data,
    statistic: Callable = np.mean,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    paired: bool = False,
    method: str = "percentile",
    lower_bound: float | None = None,
) -> dict:
    """{"value", "low", "high", "n", "n_boot"}: statistic on the data and its percentile bootstrap CI.

    `data` is one of
    - an array: rows (axis 0) are resampled with replacement, statistic(array) -> float
      (a mean of per-image SSIM, ...);
    - a tuple (a, b) of arrays: statistic(a_resampled, b_resampled), each resampled on its own
      (set-level: frechet_distance on features), or with one shared index if paired=True
      (a difference of paired per-image scores);
    - an int n, or a tuple (n_a, n_b) of ints: statistic receives the resampled index arrays
      themselves, for data that is not an array (lists of images, a precomputed distance matrix).
    "value" is the statistic on the original data; "n" the sample count (an int, or [n_a, n_b]
    for an unpaired pair). Seeded with np.random.default_rng(seed): same seed, same interval.
    `method` is "percentile" or "bias_corrected" (module doc); "bootstrap_mean" is the resamples' mean, so
    value - bootstrap_mean shows the resampling bias.
    """
    if n_boot < 1 or not 0 < ci < 1:
        raise ValueError(f"bootstrap_ci expects n_boot >= 1 and 0 < ci < 1, but got {n_boot} and {ci}")
    if method not in ("percentile", "bias_corrected"):
        raise ValueError(f"bootstrap_ci expects method 'percentile' or 'bias_corrected', but got {method!r}")
    sets, as_indices = _sets(data)
    sizes = [x if as_indices else len(x) for x in sets]
    if min(sizes) < 1:
        raise ValueError(f"bootstrap_ci expects non-empty samples, but got sizes {sizes}")
    if paired and (len(sizes) != 2 or sizes[0] != sizes[1]):
        raise ValueError(f"bootstrap_ci(paired=True) expects two samples of one length, but got sizes {sizes}")

    def apply(idx: list[np.ndarray]) -> float:
        args = idx if as_indices else [x[i] for x, i in zip(sets, idx)]
        return float(statistic(*args))

    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for t in range(n_boot):
        if paired:
            shared = rng.integers(0, sizes[0], sizes[0])
            idx = [shared, shared]
        else:
            idx = [rng.integers(0, n, n) for n in sizes]
        boots[t] = apply(idx)
    low, high = np.percentile(boots, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    value = apply([np.arange(n) for n in sizes])
    if method == "bias_corrected":
        bias = boots.mean() - value
        low, high = low - bias, high - bias
    if lower_bound is not None:
        low, high = max(low, lower_bound), max(high, lower_bound)
    n = sizes[0] if len(sizes) == 1 or paired else sizes
    return {"value": value, "low": float(low), "high": float(high), "n": n, "n_boot": int(n_boot), "method": method,
            "bootstrap_mean": float(boots.mean())}


def _sets(data) -> tuple[list, bool]:
    """-> (list of arrays or of ints, whether the statistic takes index arrays)."""
    if isinstance(data, (int, np.integer)):
        return [int(data)], True
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError(f"bootstrap_ci expects an array, a pair (a, b), an int or a pair of ints, but got a tuple of {len(data)}")
        if all(isinstance(x, (int, np.integer)) for x in data):
            return [int(x) for x in data], True
        arrays = [np.asarray(x) for x in data]
    else:
        arrays = [np.asarray(data)]
    if any(x.ndim == 0 for x in arrays):
        raise ValueError(f"bootstrap_ci expects arrays with a sample axis, but got shapes {[x.shape for x in arrays]}")
    return arrays, False

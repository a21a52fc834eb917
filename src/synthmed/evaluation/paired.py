"""Paired image metrics (SSIM, MS-SSIM, PSNR) for paired data: BCI HE->IHC, same-mask regeneration.

Inputs are uint8 (N, H, W, C) arrays, C = 3 (RGB) or 1 (greyscale), compared image i with
image i; every function returns (N,) per-image scores and the caller aggregates (a mean,
or `bootstrap_ci`). MONAI computes everything.

The defaults reproduce the BCI benchmark's evaluate.py (github.com/bupt-ai-cz/BCI,
PyramidPix2pix/evaluate.py), which reads each fake/real PNG with cv2.imread (uint8, BGR,
1024 x 1024 at full-resolution test) and calls scikit-image's
`peak_signal_noise_ratio(fake, real)` and `structural_similarity(fake, real, multichannel=True)`
with no other arguments, i.e. skimage's defaults:
- data range 255 from the uint8 dtype; here images are x / 255 with data range 1 (same values);
- SSIM: 7 x 7 uniform window, sample covariance (variances scaled by 49/48), K1 = 0.01,
  K2 = 0.03, each channel's SSIM map averaged over the interior (3 px border dropped), then
  the channels averaged (channel order, BGR or RGB, does not matter);
- PSNR: 10 log10(1 / MSE) with the MSE over all pixels and channels of the image together;
  identical images give +inf (not capped; skimage gives inf too), so aggregate with care;
- the reported number is the plain mean over images.
MONAI's SSIM uses the population covariance; the sample covariance is obtained exactly by
shrinking K2: the factor f = n / (n - 1) on every (co)variance only enters the contrast
term (2 f sxy + C2) / (f sx + f sy + C2), which equals the population term with C2 / f.

The other common protocol (Wang et al. 2004; skimage `gaussian_weights=True, sigma=1.5,
use_sample_covariance=False`; MONAI's defaults) is `ssim(..., **WANG_SSIM)`: an 11 x 11
Gaussian window with sigma 1.5 and the population covariance. Say which one a number used.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

BCI_SSIM = {"kernel_type": "uniform", "win_size": 7, "kernel_sigma": 1.5, "sample_covariance": True}
WANG_SSIM = {"kernel_type": "gaussian", "win_size": 11, "kernel_sigma": 1.5, "sample_covariance": False}
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first

PROTOCOL = {
    "source": "BCI benchmark evaluate.py (github.com/bupt-ai-cz/BCI, PyramidPix2pix/evaluate.py): skimage "
    "peak_signal_noise_ratio(fake, real) and structural_similarity(fake, real, multichannel=True) on uint8 images, "
    "defaults otherwise; computed here with MONAI",
    "input": "uint8 (N, H, W, C), C = 3 or 1, scaled to [0, 1] (x / 255), data range 1",
    "ssim": "7 x 7 uniform window, sample covariance (n / (n - 1)), K1 = 0.01, K2 = 0.03, per channel, mean over "
    "the valid (interior) map, channels averaged; WANG_SSIM gives 11 x 11 Gaussian sigma 1.5, population covariance",
    "psnr": "10 log10(1 / MSE), MSE over all pixels and channels of an image; +inf for identical images (no cap)",
    "ms_ssim": "MONAI MultiScaleSSIM, Gaussian window 7 px sigma 1.5, 3 scales with Wang et al. 2003's first "
    "3 weights renormalised to sum 1; needs min(H, W) >= ms_ssim_min_size(scales, kernel_size) (28 px by default)",
    "aggregation": "per-image scores; the benchmark reports their plain mean",
}


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    kernel_type: str = "uniform",
    win_size: int = 7,
    kernel_sigma: float = 1.5,
    sample_covariance: bool = True,
    batch_size: int = 8,
) -> np.ndarray:
    """(N,) SSIM of uint8 (N, H, W, C) pairs; defaults are BCI's (skimage defaults), WANG_SSIM the alternative."""
    ta, tb = _pair(a, b, "ssim")
    if min(ta.shape[-2:]) < win_size:
        raise ValueError(f"ssim expects images of at least win_size = {win_size} px, but got {tuple(ta.shape[-2:])}")
    k2 = 0.03
    if sample_covariance:
        n = win_size**2
        k2 *= math.sqrt((n - 1) / n)  # C2 / f with f = n / (n - 1): see the module docstring
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, kernel_type=kernel_type, win_size=win_size, kernel_sigma=kernel_sigma, k2=k2, reduction="none")
    return _batched(metric, ta, tb, batch_size)


def psnr(a: np.ndarray, b: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(N,) PSNR in dB of uint8 (N, H, W, C) pairs on the [0, 1] range; +inf where a pair is identical."""
    ta, tb = _pair(a, b, "psnr", dtype=torch.float64)
    return _batched(PSNRMetric(max_val=1.0, reduction="none"), ta, tb, batch_size)


def ms_ssim_min_size(scales: int, kernel_size: int) -> int:
    """Smallest image side MS-SSIM accepts: kernel_size * max(2 ** (scales - 1), (scales - 1) ** 2).

    The coarsest scale (side / 2 ** (scales - 1)) must still hold one window, and MONAI's own
    check wants side // (scales - 1) ** 2 >= kernel_size (stricter from 4 scales on). MONAI's
    defaults (5 scales, 11 px) need 176 px; ours (3 scales, 7 px) need 28 px.
    """
    return kernel_size * max(2 ** (scales - 1), max(1, scales - 1) ** 2)


def ms_ssim(
    a: np.ndarray,
    b: np.ndarray,
    scales: int = 3,
    kernel_size: int = 7,
    kernel_sigma: float = 1.5,
    weights: tuple[float, ...] | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """(N,) MS-SSIM of uint8 (N, H, W, C) pairs with settings that fit 64-128 px images.

    Rule: `scales` levels (each halves the image), weights = Wang et al. 2003's first `scales`
    weights renormalised to sum 1 unless given, Gaussian window `kernel_size` px; raises
    ValueError unless min(H, W) >= ms_ssim_min_size(scales, kernel_size). Defaults (3 scales,
    7 px, sigma 1.5) need 28 px; at 64 px the coarsest scale is 16 px. For >= 176 px images
    MONAI's standard setting is scales=5, kernel_size=11.
    """
    ta, tb = _pair(a, b, "ms_ssim")
    if weights is None:
        if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
            raise ValueError(f"ms_ssim expects 1 <= scales <= {len(MS_SSIM_WEIGHTS)} without explicit weights, but got {scales}")
        w = np.asarray(MS_SSIM_WEIGHTS[:scales])
        weights = tuple(float(x) for x in w / w.sum())
    elif len(weights) != scales:
        raise ValueError(f"ms_ssim expects one weight per scale ({scales}), but got {len(weights)} weights")
    need = ms_ssim_min_size(scales, kernel_size)
    if min(ta.shape[-2:]) < need:
        raise ValueError(f"ms_ssim expects images of at least {need} px for {scales} scales and a {kernel_size} px window, but got {tuple(ta.shape[-2:])}")
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=kernel_size, kernel_sigma=kernel_sigma, weights=weights, reduction="none")
    return _batched(metric, ta, tb, batch_size)


def _pair(a: np.ndarray, b: np.ndarray, name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, C) pair -> float (N, C, H, W) tensors on [0, 1]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name} expects equal shapes, but got {a.shape} and {b.shape}")
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{name} expects (N, H, W, C) images with C in (1, 3), but got shape {a.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"{name} expects uint8 images (data range 255), but got {a.dtype} and {b.dtype}")
    to_t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype) / 255.0  # noqa: E731  (N, C, H, W)
    return to_t(a), to_t(b)


def _batched(metric, ta: torch.Tensor, tb: torch.Tensor, batch_size: int) -> np.ndarray:
    """Run a MONAI metric over batches (bounded memory on 1024 px images) -> (N,) float64."""
    out = [metric(ta[i : i + batch_size], tb[i : i + batch_size]).reshape(-1) for i in range(0, len(ta), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)

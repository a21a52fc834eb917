import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from synthmed.evaluation.paired import PROTOCOL, WANG_SSIM, ms_ssim, ms_ssim_min_size, psnr, ssim


def images(n=3, size=64, channels=3, seed=0):
    """Smooth textured uint8 images (blurred noise), like tissue more than like white noise."""
    x = gaussian_filter(np.random.default_rng(seed).normal(size=(n, size, size, channels)), sigma=(0, 2, 2, 0))
    x = (x - x.min()) / (x.max() - x.min())
    return (x * 255).round().astype(np.uint8)


def noisy(x, amount=20, seed=1):
    return np.clip(x.astype(int) + np.random.default_rng(seed).integers(-amount, amount + 1, x.shape), 0, 255).astype(np.uint8)


def to_t(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255.0


@pytest.mark.parametrize("channels", [3, 1])
def test_ssim_matches_skimage_under_both_protocols(channels):
    a = images(channels=channels)
    b = noisy(a)
    bci = [structural_similarity(x, y, channel_axis=-1) for x, y in zip(a, b)]  # BCI evaluate.py: skimage defaults
    wang = [structural_similarity(x, y, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False) for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim(a, b), bci, atol=1e-4)
    np.testing.assert_allclose(ssim(a, b, **WANG_SSIM), wang, atol=1e-4)


def test_ssim_and_psnr_match_monai_called_directly():
    a = images(seed=2)
    b = noisy(a, seed=3)
    direct = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(to_t(a).float(), to_t(b).float()).flatten().numpy()
    np.testing.assert_allclose(ssim(a, b, **WANG_SSIM), direct, atol=1e-4)
    uniform = SSIMMetric(spatial_dims=2, data_range=1.0, kernel_type="uniform", win_size=7, reduction="none")(to_t(a).float(), to_t(b).float())
    np.testing.assert_allclose(ssim(a, b, sample_covariance=False), uniform.flatten().numpy(), atol=1e-4)
    direct_psnr = PSNRMetric(max_val=1.0, reduction="none")(to_t(a), to_t(b)).flatten().numpy()
    np.testing.assert_allclose(psnr(a, b), direct_psnr, atol=1e-4)


def test_psnr_matches_skimage_and_is_inf_for_identical_images():
    a = images(seed=4)
    b = noisy(a, amount=10, seed=5)
    np.testing.assert_allclose(psnr(a, b), [peak_signal_noise_ratio(x, y) for x, y in zip(a, b)], rtol=1e-6)
    assert np.all(np.isposinf(psnr(a, a)))  # not capped
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-6)
    assert PROTOCOL["source"].startswith("BCI")


@pytest.mark.parametrize("size", [64, 128])
def test_ms_ssim_at_small_sizes_is_one_on_identical_pairs_and_lower_with_noise(size):
    a = images(n=2, size=size, seed=6)
    np.testing.assert_allclose(ms_ssim(a, a), 1.0, atol=1e-5)
    light, heavy = ms_ssim(a, noisy(a, 10, seed=7)), ms_ssim(a, noisy(a, 60, seed=8))
    assert np.all(heavy < light) and np.all(light < 1.0)


@pytest.mark.parametrize("scales,kernel_size,need", [(5, 11, 176), (4, 7, 63), (3, 7, 28), (2, 7, 14)])
def test_ms_ssim_size_rule(scales, kernel_size, need):
    assert ms_ssim_min_size(scales, kernel_size) == need
    ok = images(n=1, size=need, seed=9)
    assert ms_ssim(ok, noisy(ok), scales=scales, kernel_size=kernel_size).shape == (1,)
    small = images(n=1, size=need - 1, seed=9)
    with pytest.raises(ValueError, match=f"at least {need} px"):
        ms_ssim(small, small, scales=scales, kernel_size=kernel_size)


def test_shape_channel_and_dtype_errors_name_what_they_got():
    a = images(n=2, size=32)
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 3\) and \(2, 32, 32, 1\)"):
        ssim(a, a[..., :1])
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 3\) and \(1, 32, 32, 3\)"):
        psnr(a, a[:1])
    with pytest.raises(ValueError, match="C in"):
        ms_ssim(a[..., :2], a[..., :2])
    with pytest.raises(ValueError, match="uint8"):
        ssim(a.astype(np.float32), a.astype(np.float32))

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric

from synthmed.evaluation.fidelity import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    per_class,
    precision_recall,
)


def gauss(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fid_of_a_set_with_itself_is_zero():
    a = gauss(500, 8)
    assert abs(frechet_distance(a, a)) < 1e-6 * np.trace(np.cov(a, rowvar=False))


def test_fid_of_unit_gaussians_is_squared_mean_shift_and_grows_with_it():
    a = gauss(20000, 4, seed=1)
    fids = []
    for s in (0.25, 0.5, 1.0, 2.0):
        mu = np.full(4, s)
        fids.append(frechet_distance(a, gauss(20000, 4, mu, seed=2)))
        # sample-mean error: 2 mu.e with e ~ N(0, 2/N I) has std 2 |mu| sqrt(2/N); covariance bias ~ D^2 / N
        assert fids[-1] == pytest.approx(mu @ mu, abs=0.01 + 4 * 2 * np.linalg.norm(mu) * np.sqrt(2 / 20000))
    assert np.all(np.diff(fids) > 0)


def test_fid_core_equals_closed_form_for_gaussians():
    # Commuting covariances: tr(sqrt(S1 S2)) = sum sqrt(l1 * l2) over a shared eigenbasis.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    l1, l2 = rng.uniform(0.5, 3, 5), rng.uniform(0.5, 3, 5)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fid_equals_monai_fidmetric():
    a, b = gauss(300, 16, seed=4), gauss(200, 16, 0.3, seed=5)
    monai = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert frechet_distance(a, b) == pytest.approx(monai, rel=1e-9)


def test_fid_warns_when_samples_do_not_exceed_dimension():
    a, b = gauss(10, 16, seed=6), gauss(40, 16, seed=7)
    with pytest.warns(UserWarning, match="rank-deficient"):
        value = frechet_distance(a, b)
    assert np.isfinite(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(gauss(17, 16), gauss(17, 16, seed=1))  # N = D + 1: no warning


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(10, 4\) and \(10, 5\)"):
        frechet_distance(gauss(10, 4), gauss(10, 5))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


def kid_reference(x, y, degree=3, coef0=1.0):
    """The unbiased MMD^2 with explicit loops over pairs."""
    m, d = len(x), x.shape[1]
    k = lambda u, v: (u @ v / d + coef0) ** degree  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_reference_on_a_tiny_case():
    x, y = gauss(6, 3, seed=8), gauss(6, 3, 0.5, seed=9)
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=6)  # subset = whole set, permuted
    assert mean == pytest.approx(kid_reference(x, y), rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_zero_for_one_distribution_and_positive_for_shifted():
    a, b = gauss(400, 8, seed=10), gauss(400, 8, seed=11)
    mean, std = kernel_inception_distance(a, b, subsets=50, subset_size=200)
    assert abs(mean) < 3 * std / np.sqrt(50) + 1e-3
    shifted, shifted_std = kernel_inception_distance(a, gauss(400, 8, 1.0, seed=12), subsets=50, subset_size=200)
    assert shifted > 10 * shifted_std / np.sqrt(50) and shifted > 0.1


def test_kid_caps_subset_size_at_small_n_and_is_seeded():
    a, b = gauss(12, 64, seed=13), gauss(30, 64, seed=14)
    first = kernel_inception_distance(a, b, subsets=10)  # subset_size 1000 capped to 12
    assert np.isfinite(first).all() and first == kernel_inception_distance(a, b, subsets=10)
    assert first != kernel_inception_distance(a, b, subsets=10, seed=1)


def test_precision_recall_known_cases():
    real = gauss(300, 5, seed=15)
    assert precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0}
    # Fake collapsed onto a tight mode near one real point: all inside the real manifold, covering little of it.
    mode = real[0] + 0.01 * gauss(100, 5, seed=16)
    collapsed = precision_recall(real, mode)
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.1
    far = precision_recall(real, gauss(300, 5, 100.0, seed=17))
    assert far == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_chunking_does_not_change_the_answer():
    real, fake = gauss(200, 4, seed=18), gauss(150, 4, 0.7, seed=19)
    assert precision_recall(real, fake, chunk=17) == precision_recall(real, fake, chunk=1000)


def test_precision_recall_rejects_k_too_large():
    with pytest.raises(ValueError, match="k < min"):
        precision_recall(gauss(3, 2), gauss(10, 2), k=3)


def test_per_class_skips_classes_with_too_few_samples():
    a, b = gauss(60, 3, seed=20), gauss(60, 3, seed=21)
    la = np.array([0] * 30 + [1] * 29 + [2])
    lb = np.array([0] * 30 + [1] * 30)
    out = per_class(frechet_distance, a, la, b, lb, classes=[0, 1, 2], min_count=5)
    assert out[0]["value"] == pytest.approx(frechet_distance(a[:30], b[:30])) and out[0]["n_a"] == 30
    assert out[2] == {"value": None, "n_a": 1, "n_b": 0}


@pytest.mark.parametrize("n_a, n_b, d", [(300, 200, 16), (40, 400, 64)])  # full rank, and rank-deficient as in small evaluations
def test_eigenvalue_form_equals_the_sqrtm_form(n_a, n_b, d):
    import warnings

    from synthmed.evaluation.fidelity import frechet_distance_eig

    a, b = gauss(n_a, d, seed=8), gauss(n_b, d, 0.2, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = frechet_distance(a, b)
    assert frechet_distance_eig(a, b) == pytest.approx(exact, rel=1e-7)

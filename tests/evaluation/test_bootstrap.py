import numpy as np
import pytest

from synthmed.evaluation.bootstrap import bootstrap_ci
from synthmed.evaluation.fidelity import frechet_distance


def test_ci_of_a_mean_covers_the_truth_with_the_normal_width():
    n = 400
    x = np.random.default_rng(0).normal(size=n)
    r = bootstrap_ci(x, np.mean, n_boot=2000)
    assert r["low"] < 0 < r["high"] and r["low"] < r["value"] < r["high"]
    assert r["high"] - r["low"] == pytest.approx(2 * 1.96 / np.sqrt(n), rel=0.15)
    assert r["value"] == pytest.approx(x.mean()) and r["n"] == n and r["n_boot"] == 2000


def test_same_seed_same_interval_other_seed_other_interval():
    x = np.random.default_rng(1).normal(size=50)
    assert bootstrap_ci(x, np.mean, n_boot=200, seed=3) == bootstrap_ci(x, np.mean, n_boot=200, seed=3)
    assert bootstrap_ci(x, np.mean, n_boot=200, seed=3)["low"] != bootstrap_ci(x, np.mean, n_boot=200, seed=4)["low"]


def test_set_level_fid_on_features_and_the_index_form_agree():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 3)), rng.normal(size=(150, 3)) + 1.0
    r = bootstrap_ci((a, b), frechet_distance, n_boot=50)
    assert r["value"] == pytest.approx(frechet_distance(a, b)) and r["low"] < r["value"] < r["high"]
    assert r["n"] == [200, 150]
    by_index = bootstrap_ci((200, 150), lambda ia, ib: frechet_distance(a[ia], b[ib]), n_boot=50)
    assert by_index == r  # same seed, same draws


def test_paired_resamples_both_with_one_index():
    rng = np.random.default_rng(5)
    a = rng.normal(size=100)
    b = a + 0.5 + 0.01 * rng.normal(size=100)  # paired difference is nearly constant
    r = bootstrap_ci((a, b), lambda x, y: np.mean(y - x), n_boot=300, paired=True)
    assert r["n"] == 100 and r["high"] - r["low"] < 0.01
    unpaired = bootstrap_ci((a, b), lambda x, y: np.mean(y) - np.mean(x), n_boot=300)
    assert unpaired["high"] - unpaired["low"] > 10 * (r["high"] - r["low"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="one length"):
        bootstrap_ci((np.zeros(3), np.zeros(4)), lambda x, y: 0.0, paired=True)
    with pytest.raises(ValueError, match="0 < ci < 1"):
        bootstrap_ci(np.zeros(3), ci=95)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.zeros(0))


def test_bias_corrected_interval_corrects_fids_resampling_bias():
    """Resampled sets repeat rows, so bootstrap FIDs sit above the estimate: the percentile interval
    misses the estimate itself on a high-dimensional case, the bias-corrected one is centred back on it."""
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(60, 16)), rng.normal(size=(60, 16)) + 0.3
    pct = bootstrap_ci((a, b), frechet_distance, n_boot=200)
    shifted = bootstrap_ci((a, b), frechet_distance, n_boot=200, method="bias_corrected", lower_bound=0.0)
    assert pct["bootstrap_mean"] > pct["value"] and pct["low"] > pct["value"]  # the bias the shifted method fixes
    assert shifted["low"] < shifted["value"] < shifted["high"] and shifted["method"] == "bias_corrected"
    assert shifted["high"] - shifted["low"] == pytest.approx(pct["high"] - pct["low"])
    same = bootstrap_ci((a, a[::-1].copy()), frechet_distance, n_boot=100, method="bias_corrected", lower_bound=0.0)
    assert same["low"] == 0.0  # FID of a set against itself: the floor, not a negative distance
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci(a, np.mean, method="bca")

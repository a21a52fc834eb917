import math

import numpy as np
import pytest

from synthmed.evaluation.downstream_metrics import (
    classification_scores,
    over_seeds,
    paired_comparison,
    segmentation_scores,
    sensitivity_at_specificity,
)

NAMES = ["a", "b"]
T975_DF2 = math.sqrt(1.805 / 0.0975)  # t(0.975, 2) in closed form: F(t) = 1/2 + t / (2 sqrt(t^2 + 2)) for df 2


def test_perfect_segmentation():
    t = np.zeros((2, 8, 8), np.uint8)
    t[:, 1:4, 1:4] = 1
    t[1, 5:7, 5:7] = 2
    r = segmentation_scores(t.copy(), t, NAMES)
    assert (r["dice"], r["iou"], r["hd95"], r["n_images"]) == (1.0, 1.0, 0.0, 2)
    assert r["per_class"]["a"] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "n_images": 2, "n_hd95": 2, "n_missed": 0, "n_spurious": 0}
    assert r["per_class"]["b"]["n_images"] == 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_of_a_line_shifted_by_k(k):
    t = np.zeros((1, 8, 8), np.uint8)
    t[0, 1, 1:7] = 1
    p = np.roll(t, k, axis=1)  # every pixel of either line is exactly k from the other
    assert segmentation_scores(p, t, NAMES)["per_class"]["a"]["hd95"] == pytest.approx(k)


def test_hd95_ignores_a_5_percent_outlier():
    t = np.zeros((1, 8, 48), np.uint8)
    t[0, 2, 2:42] = 1  # 40 px
    p = np.roll(t, 1, axis=1)
    p[0, 7, 47] = 1  # 1 of 41 predicted px is sqrt(5^2 + 6^2) away: the max, not the 95th percentile
    assert segmentation_scores(p, t, NAMES)["hd95"] == pytest.approx(1.0)


def test_absent_class_conventions():
    t = np.zeros((3, 6, 6), np.uint8)
    p = np.zeros_like(t)
    t[0, :2, :2] = p[0, :2, :2] = 1  # image 0: a found exactly
    t[1, :2, :2] = 1  # image 1: a missed -> Dice 0, not in HD95
    t[1, 4:, 4:] = 2  # image 1: b missed -> b's only image
    p[2, :2, :2] = 1  # image 2: a spurious -> in neither Dice nor HD95
    r = segmentation_scores(p, t, NAMES)
    a, b = r["per_class"]["a"], r["per_class"]["b"]
    assert (a["dice"], a["iou"], a["hd95"]) == (pytest.approx(0.5), pytest.approx(0.5), 0.0)
    assert (a["n_images"], a["n_hd95"], a["n_missed"], a["n_spurious"]) == (2, 1, 1, 1)
    assert (b["dice"], b["hd95"], b["n_images"], b["n_hd95"], b["n_missed"]) == (0.0, None, 1, 0, 1)
    assert r["dice"] == pytest.approx(0.25) and r["hd95"] == 0.0  # HD95's mean skips b, never found
    conf = r["confusion"]
    assert conf["classes"] == ["background", "a", "b"] and sum(map(sum, conf["pixels"])) == t.size
    assert conf["pixels"][1] == [4, 4, 0] and conf["pixels"][2] == [4, 0, 0] and conf["pixels"][0][1] == 4  # a missed, b missed, a spurious
    assert segmentation_scores(p, t, NAMES, chunk=1)["confusion"] == conf  # the same by chunks


def test_class_absent_everywhere_is_none():
    t = np.zeros((1, 4, 4), np.uint8)
    t[0, :2] = 1
    r = segmentation_scores(t.copy(), t, NAMES)
    assert r["per_class"]["b"] == {"dice": None, "iou": None, "hd95": None, "n_images": 0, "n_hd95": 0, "n_missed": 0, "n_spurious": 0}
    assert r["dice"] == 1.0


def _probs_for(preds, k):
    """Rows with 0.8 on the predicted class, the rest spread evenly."""
    probs = np.full((len(preds), k), 0.2 / (k - 1))
    probs[np.arange(len(preds)), preds] = 0.8
    return probs


def test_three_class_confusion_matrix():
    # rows true, columns predicted: [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 1, 0, 1, 1, 2, 2, 2])
    r = classification_scores(_probs_for(preds, 3), labels, ["x", "y", "z"])
    assert r["accuracy"] == pytest.approx(0.7)
    assert r["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 4 + 2 / 2) / 3)
    assert r["macro_f1"] == pytest.approx((6 / 8 + 4 / 7 + 4 / 5) / 3)  # F1 = 2TP / (2TP + FP + FN)
    assert r["per_class"]["y"] == pytest.approx({"recall": 0.5, "precision": 2 / 3, "f1": 4 / 7, "auc": r["per_class"]["y"]["auc"], "n": 4})
    assert r["sensitivity_at_90_specificity"] is None and r["n"] == 10


def test_macro_f1_counts_a_class_only_predicted():
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 2, 1, 1])  # z never labelled, once predicted: F1 0, no recall
    r = classification_scores(_probs_for(preds, 4), labels, ["x", "y", "z", "w"])
    assert r["per_class"]["z"]["f1"] == 0.0 and r["per_class"]["z"]["recall"] is None
    assert r["per_class"]["w"]["f1"] is None  # in neither labels nor predictions: left out
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)


def _binary(scores):
    scores = np.asarray(scores, dtype=float)
    return np.stack([1 - scores, scores], axis=1)


@pytest.mark.parametrize(
    "pos_scores, neg_scores, auc",
    [([0.6, 0.9], [0.1, 0.4], 1.0), ([0.1, 0.4], [0.6, 0.9], 0.0), ([0.5, 0.8], [0.5, 0.2], 3.5 / 4)],  # tie counts half
)
def test_binary_auc(pos_scores, neg_scores, auc):
    labels = np.array([1] * len(pos_scores) + [0] * len(neg_scores))
    r = classification_scores(_binary(pos_scores + neg_scores), labels, ["neg", "pos"])
    assert r["auc"] == pytest.approx(auc)
    flipped = classification_scores(_binary(pos_scores + neg_scores), labels, ["neg", "pos"], positive="neg")
    assert flipped["auc"] == pytest.approx(auc)  # AUC(1 - s, label 0) = AUC(s, label 1) for two classes


def test_multiclass_auc_skips_a_class_without_positives():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.6, 0.3, 0.1]])
    r = classification_scores(probs, labels, ["x", "y", "z"])
    # x vs rest: positives 0.7, 0.5 against 0.2, 0.6 -> 3 of 4 pairs; y vs rest: 0.6, 0.3 against 0.2, 0.3 -> 3.5 of 4
    assert r["per_class"]["x"]["auc"] == pytest.approx(0.75) and r["per_class"]["z"]["auc"] is None
    assert r["auc"] == pytest.approx((0.75 + 0.875) / 2)


def test_sensitivity_at_specificity():
    neg = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.8]
    pos = [0.2, 0.3, 0.4, 0.42, 0.5, 0.6, 0.7, 0.85, 0.9, 0.95]
    labels = np.array([0] * 10 + [1] * 10)
    r = classification_scores(_binary(neg + pos), labels, ["neg", "pos"])
    assert r["sensitivity_at_90_specificity"] == pytest.approx(0.6)  # t = 0.5: only the 0.8 negative above
    strict = classification_scores(_binary(neg + pos), labels, ["neg", "pos"], specificity=0.95)
    assert strict["sensitivity_at_95_specificity"] == pytest.approx(0.3)  # t = 0.85: no negative above
    assert sensitivity_at_specificity(np.array([0.2, 0.9]), np.array([False, True]), 0.99) == 1.0
    assert sensitivity_at_specificity(np.array([0.9, 0.2]), np.array([False, True]), 0.99) == 0.0  # only "never positive"


def test_over_seeds_hand_t_interval():
    r = over_seeds([1.0, 2.0, None, 3.0, float("nan")])
    assert (r["mean"], r["std"], r["n"], r["n_missing"]) == (2.0, 1.0, 3, 2)
    assert r["low"] == pytest.approx(2 - T975_DF2 / math.sqrt(3)) and r["high"] == pytest.approx(2 + T975_DF2 / math.sqrt(3))
    assert over_seeds([0.7]) == {"mean": 0.7, "std": None, "low": None, "high": None, "n": 1, "n_missing": 0}
    assert over_seeds([None])["mean"] is None
    wide = over_seeds([0.2, 0.9, 0.95], bounds=(0.0, 1.0))  # a bounded metric over 3 seeds: the raw t interval leaves [0, 1]
    raw = over_seeds([0.2, 0.9, 0.95])
    assert raw["low"] < 0 and raw["high"] > 1 and (wide["low"], wide["high"], wide["clipped"]) == (0.0, 1.0, True)
    assert "clipped" not in over_seeds([0.5, 0.52, 0.51], bounds=(0.0, 1.0))


def test_paired_comparison_hand_values():
    a, b = [0.70, 0.72, 0.74], [0.75, 0.73, 0.80]  # d = 0.05, 0.01, 0.06: mean 0.04, variance 0.0007
    r = paired_comparison(a, b)
    assert r["mean_diff"] == pytest.approx(0.04) and (r["n"], r["wins"], r["losses"]) == (3, 3, 0)
    half = T975_DF2 * math.sqrt(0.0007 / 3)
    assert (r["low"], r["high"]) == (pytest.approx(0.04 - half), pytest.approx(0.04 + half))
    assert r["p_ttest"] == pytest.approx(1 - math.sqrt(24 / 31))  # df 2: p = 1 - t / sqrt(t^2 + 2), t^2 = 48/7
    assert r["p_wilcoxon"] == pytest.approx(0.25)  # 3 seeds: the smallest exact p there is


def test_paired_comparison_zero_variance_cases():
    const = paired_comparison([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert const["p_ttest"] == 0.0 and (const["low"], const["high"]) == (1.0, 1.0)
    same = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["p_ttest"] is None and same["p_wilcoxon"] is None and (same["mean_diff"], same["low"], same["wins"]) == (0.0, 0.0, 0)


def test_paired_comparison_drops_missing_pairs():
    r = paired_comparison([1.0, None, 3.0], [2.0, 5.0, float("nan")])
    assert (r["n"], r["n_dropped"], r["mean_diff"]) == (1, 2, 1.0)
    assert r["low"] is None and r["p_ttest"] is None and r["p_wilcoxon"] is None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: segmentation_scores(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), NAMES), "one shape"),
        (lambda: segmentation_scores(np.zeros((4, 4)), np.zeros((4, 4)), NAMES), r"\(N, H, W\)"),
        (lambda: segmentation_scores(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)), NAMES), "non-empty"),
        (lambda: segmentation_scores(np.full((1, 2, 2), 3), np.zeros((1, 2, 2)), NAMES), "codes in 0..2"),
        (lambda: classification_scores(np.full((2, 3), 1 / 3), np.array([0, 1]), NAMES), r"shape \(N >= 1, 2\)"),
        (lambda: classification_scores(_binary([0.2, 0.7]), np.array([0, 2]), NAMES), "labels in 0..1"),
        (lambda: classification_scores(np.array([[0.5, 0.7], [0.5, 0.5]]), np.array([0, 1]), NAMES), "summing to 1"),
        (lambda: classification_scores(_binary([0.2, 0.7]), np.array([0, 1]), NAMES, positive="c"), "positive"),
        (lambda: classification_scores(np.full((1, 3), 1 / 3), np.array([0]), ["x", "y", "z"], positive=1), "positive=None"),
        (lambda: classification_scores(_binary([0.2, 0.7]), np.array([0, 1]), NAMES, specificity=1.0), "specificity"),
        (lambda: over_seeds([[1.0, 2.0]]), "1-D"),
        (lambda: over_seeds([1.0, "x"]), "numbers or None"),
        (lambda: over_seeds([1.0, float("inf")]), "finite"),
        (lambda: paired_comparison([1.0, 2.0], [1.0]), "one length"),
        (lambda: paired_comparison([1.0], [1.0], ci=95), "0 < ci < 1"),
    ],
)
def test_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()

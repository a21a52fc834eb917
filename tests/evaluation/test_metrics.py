import numpy as np
import pytest

from synthmed.evaluation.metrics import derangement, dice_iou, one_hot

NAMES = ["a", "b"]


def test_dice_iou_known_cases():
    t = np.zeros((1, 4, 4), np.uint8)
    t[0, :2, :2] = 1  # 4 px of class a
    t[0, 2:, 2:] = 2  # 4 px of class b
    perfect = dice_iou(t.copy(), t, NAMES)
    assert perfect["dice"] == pytest.approx(1.0) and perfect["iou"] == pytest.approx(1.0)
    p = t.copy()
    p[0, 0, 0] = 0  # class a: 3 of 4 found -> Dice 6/7, IoU 3/4
    p[0, 2:, 2:] = 1  # class b missed, predicted as a
    r = dice_iou(p, t, NAMES)
    assert r["per_class"]["a"]["dice"] == pytest.approx(2 * 3 / (7 + 4))
    assert r["per_class"]["b"]["dice"] == pytest.approx(0.0)
    assert r["dice"] == pytest.approx((6 / 11 + 0) / 2)
    assert r["dice_foreground"] == pytest.approx(2 * 7 / (7 + 8))


def test_absent_class_is_ignored_not_zero():
    t = np.zeros((2, 4, 4), np.uint8)
    t[:, :2] = 1
    r = dice_iou(t.copy(), t, NAMES)
    assert r["per_class"]["b"]["dice"] is None and r["dice"] == pytest.approx(1.0)


def test_derangement_and_one_hot_validation():
    perm = derangement(10, 3)
    assert sorted(perm) == list(range(10)) and not np.any(perm == np.arange(10))
    with pytest.raises(ValueError, match="codes in 0..2"):
        one_hot(np.full((1, 2, 2), 5), 2)

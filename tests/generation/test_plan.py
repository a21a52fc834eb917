"""The planner: class counts, targets, and reproducible layouts (hand-made cases)."""

import numpy as np
import pytest

from synthmed.config import LayoutConfig, PlanConfig
from synthmed.generation.plan import TrainingLayouts, additions, make_plan, sample_seed


def _classification(n_per_class=(8, 2)):
    rng = np.random.default_rng(0)
    labels = [c for c, n in zip(("benign", "malignant"), n_per_class) for _ in range(n)]
    rows = [{"id": f"r{i}", "text": f"breast ultrasound, {lab}", "label": lab, "patient_id": f"p{i}"} for i, lab in enumerate(labels)]
    cond = (rng.random((len(rows), 16, 16, 1)) > 0.8).astype(np.uint8) * 255
    return TrainingLayouts(rows, ["benign", "malignant"], None, [None] * len(rows), cond, labels)


def test_targets_from_real_counts():
    real = {"a": 100, "b": 10, "c": 40}
    assert additions(real, "balance", None, 2, {}) == {"a": 0, "b": 90, "c": 60}
    assert additions(real, "balance", ["b"], 2, {}) == {"a": 0, "b": 90, "c": 0}
    assert additions(real, "multiply", ["b"], 3, {}) == {"a": 0, "b": 20, "c": 0}
    assert additions(real, "counts", None, 2, {"c": 5}) == {"a": 0, "b": 0, "c": 5}
    with pytest.raises(ValueError, match="classes among"):
        additions(real, "counts", None, 2, {"z": 1})
    with pytest.raises(ValueError, match="multiply expects"):
        additions(real, "multiply", None, 2, {})


def test_classification_plan_balances_images_and_caps_proportionally():
    train = _classification()
    summary, entries = make_plan(train, PlanConfig(mode="balance"), 0, LayoutConfig(), seed=3)
    assert summary["unit"] == "images" and summary["real"] == {"benign": 8, "malignant": 2}
    assert summary["planned"] == {"benign": 0, "malignant": 6} and summary["combined"] == {"benign": 8, "malignant": 8}
    assert all(item["label"] == "malignant" and item["source_id"] in ("r8", "r9") for item, _ in entries)
    assert [item["id"] for item, _ in entries] == [f"syn_{k:06d}" for k in range(6)]
    capped, _ = make_plan(train, PlanConfig(mode="counts", counts={"benign": 6, "malignant": 2}, max_samples=4), 0, LayoutConfig(), seed=3)
    assert capped["planned"] == {"benign": 3, "malignant": 1} and capped["shortfall"] == {"benign": 3, "malignant": 1}


def test_layouts_are_reproducible_and_recorded():
    train = _classification()
    cfg = PlanConfig(mode="counts", counts={"malignant": 5})
    a = make_plan(train, cfg, 0, LayoutConfig(elastic=1.0), seed=1)[1]
    b = make_plan(train, cfg, 0, LayoutConfig(elastic=1.0), seed=1)[1]
    c = make_plan(train, cfg, 0, LayoutConfig(elastic=1.0), seed=2)[1]
    assert [x[0]["layout"] for x in a] == [x[0]["layout"] for x in b] != [x[0]["layout"] for x in c]
    assert all(np.array_equal(x[1].cond, y[1].cond) for x, y in zip(a, b))
    assert all({op["op"] for op in item["layout"]} >= {"elastic"} for item, _ in a)


def test_nothing_to_add_is_an_error():
    with pytest.raises(ValueError, match="nothing to generate"):
        make_plan(_classification((4, 4)), PlanConfig(mode="balance"), 0, LayoutConfig(), seed=0)


def test_sample_seeds_are_distinct_per_index_and_attempt():
    seeds = {sample_seed(0, i, a) for i in range(200) for a in range(3)}
    assert len(seeds) == 600 and sample_seed(0, 5, 1) == sample_seed(0, 5, 1) != sample_seed(1, 5, 1)


def test_image_plan_on_a_data_set_with_masks_counts_labels_not_mask_classes():
    """phantom-breast: masks name lesions (benign, malignant), labels also have normal; unit images balances the labels."""
    rng = np.random.default_rng(0)
    labels = ["benign"] * 6 + ["normal"] * 4 + ["malignant"] * 2
    rows = [{"id": f"r{i}", "text": lab, "label": lab, "cancer": "cancerous" if lab == "malignant" else "non-cancerous"} for i, lab in enumerate(labels)]
    masks = np.zeros((12, 16, 16), np.uint8)
    masks[:6, 4:8, 4:8], masks[10:, 4:9, 4:9] = 1, 2
    train = TrainingLayouts(rows, ["benign", "malignant"], masks, [None] * 12, (rng.random((12, 16, 16, 1)) > 0.8).astype(np.uint8) * 255, labels)
    summary, entries = make_plan(train, PlanConfig(mode="balance", unit="images"), 0, LayoutConfig(), seed=0)
    assert summary["real"] == {"benign": 6, "malignant": 2, "normal": 4} and summary["planned"] == {"benign": 0, "malignant": 4, "normal": 2}
    for item, _ in entries:  # every synthetic image starts from a training sample of its own class
        assert item["row_fields"]["cancer"] == ("cancerous" if item["label"] == "malignant" else "non-cancerous")

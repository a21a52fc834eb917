"""Edge-map fidelity: the boundary F-score with a pixel tolerance, and what the flow reports."""

import numpy as np
import pytest

from synthmed.evaluation.edges import edge_prf, edge_scores


def _square(offset=0, size=32):
    m = np.zeros((size, size), bool)
    m[8 + offset, 8:24] = m[23 + offset, 8:24] = True
    m[8 + offset:24 + offset, 8] = m[8 + offset:24 + offset, 23] = True
    return m


def test_identical_maps_score_one_and_a_shift_within_tolerance_is_forgiven():
    ref = _square()
    assert edge_prf(ref, ref, 0) == (1.0, 1.0, 1.0)
    p, r, f = edge_prf(_square(offset=2), ref, tolerance=2)
    assert p == r == f == 1.0  # 2 px off, 2 px tolerance
    p, r, f = edge_prf(_square(offset=2), ref, tolerance=1)
    assert f < 0.7  # the horizontal edges now miss; only the vertical sides overlap
    p, r, f = edge_prf(_square(offset=6), ref, tolerance=2)
    assert 0 < f < edge_prf(_square(offset=2), ref, tolerance=1)[2]


def test_precision_and_recall_see_extra_and_missing_edges_apart():
    ref = _square()
    extra = ref.copy()
    extra[28, :] = True  # a spurious line: precision drops, recall stays
    p, r, _ = edge_prf(extra, ref, 1)
    assert r == 1.0 and p == pytest.approx(ref.sum() / extra.sum())
    half = ref.copy()
    half[:, 16:] = False  # half the square missing: recall drops, precision stays
    p, r, _ = edge_prf(half, ref, 1)
    assert p == 1.0 and r < 0.7


def test_empty_maps_are_undefined_or_zero_never_perfect():
    empty = np.zeros((16, 16), bool)
    assert edge_prf(empty, empty) == (None, None, None)
    assert edge_prf(empty, _square(size=32)[:16, :16])[2] == 0.0
    assert edge_prf(_square(size=32)[:16, :16], empty) == (0.0, None, 0.0)
    scores = edge_scores(np.stack([empty, _square()[:16, :16]]), np.stack([empty, _square()[:16, :16]]))
    assert np.isnan(scores["f"][0]) and scores["f"][1] == 1.0
    with pytest.raises(ValueError, match="one shape"):
        edge_prf(empty, np.zeros((8, 8)))


def test_flow_edge_fidelity_separates_own_maps_from_shuffled_ones():
    """Images whose edges are their maps score F = 1; against a shuffled pairing they do not."""
    from synthmed.config import EvaluateConfig
    from synthmed.data.conditioning import ConditioningSpec, canny_edges
    from synthmed.evaluation.sections import edge_fidelity

    rng = np.random.default_rng(0)
    images = []
    for _ in range(6):
        im = np.full((48, 48), 40, np.uint8)
        y, x, h, w = rng.integers(4, 20, 4)
        im[y:y + h + 8, x:x + w + 8] = 200
        images.append(np.repeat(im[..., None], 3, -1))
    images = np.stack(images)
    spec = ConditioningSpec(("canny",), 1.0, 0.05, 0.15)
    cond = np.stack([canny_edges(im, spec)[..., None] for im in images])
    card = {"conditioning": {"builders": ["canny"], "channel_names": ["canny"], "canny": {"sigma": 1.0, "low": 0.05, "high": 0.15, "region": "image"}}, "classes": ["x"]}
    res = edge_fidelity(card, images, cond, None, EvaluateConfig(n_boot=20), "test")
    assert res["f"]["value"] == pytest.approx(1.0) and res["f_shuffled"]["value"] < 0.6
    assert res["f_minus_shuffled"]["low"] > 0 and res["better_than_shuffled"] == 1.0
    card_colour = {"conditioning": {"builders": ["colour"], "channel_names": ["colour:r", "colour:g", "colour:b"]}, "classes": ["x"]}
    assert edge_fidelity(card_colour, images, np.zeros((6, 48, 48, 3), np.uint8), None, EvaluateConfig(n_boot=20), "test") is None

import numpy as np
import pytest

from synthmed.data.phantoms.histology import CLASSES, iter_tiles, phantom_samples, render_tile, split_slides


def test_tile_is_a_pure_function_of_seed_and_index():
    a, b = render_tile(3, 17), render_tile(3, 17)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.class_mask, b.class_mask)
    assert not np.array_equal(render_tile(4, 17).image, a.image)
    first = [t.image for t in iter_tiles(3, 2, 3)]
    again = [t.image for t in iter_tiles(3, 5, 3)][:6]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


def test_masks_agree_with_each_other():
    for t in iter_tiles(0, 3, 4):
        assert t.image.shape == (64, 64, 3) and t.image.dtype == np.uint8
        assert np.array_equal(t.instance_mask > 0, t.class_mask > 0)
        for inst in np.unique(t.instance_mask)[1:]:
            assert len(np.unique(t.class_mask[t.instance_mask == inst])) == 1  # one class per nucleus


def _nuclei_stats(n_tiles_slides=25):
    counts, areas, darkness = np.zeros(6), {c: [] for c in range(1, 6)}, {c: [] for c in range(1, 6)}
    for t in iter_tiles(0, n_tiles_slides, 8):
        grey = t.image.mean(-1)
        for inst in np.unique(t.instance_mask)[1:]:
            region = t.instance_mask == inst
            c = int(t.class_mask[region][0])
            counts[c] += 1
            areas[c].append(region.sum())
            darkness[c].append(255 - grey[region].mean())
    return counts, {c: np.median(v) for c, v in areas.items()}, {c: np.median(v) for c, v in darkness.items()}


def test_classes_are_imbalanced_with_rare_dead_and_distinct_morphology():
    counts, area, dark = _nuclei_stats()
    frac = counts[1:] / counts[1:].sum()
    assert all(counts[1:] > 0)
    assert 0.005 < frac[CLASSES.index("dead")] < 0.05  # rare, about 2% of nuclei
    assert frac[CLASSES.index("dead")] < 0.25 * frac.max()
    neo, inf, con, dead, epi = (CLASSES.index(c) + 1 for c in CLASSES)
    assert area[neo] > area[epi] > area[inf]  # size differs by class
    assert dark[inf] > dark[epi]  # dense lymphocytes vs vesicular epithelium


def test_larger_size_shows_the_same_field():
    small, big = render_tile(0, 5, 64), render_tile(0, 5, 128)
    down = big.class_mask[::2, ::2] > 0
    inter = (down & (small.class_mask > 0)).sum()
    union = (down | (small.class_mask > 0)).sum()
    assert inter / union > 0.6
    with pytest.raises(ValueError, match="size"):
        render_tile(0, 0, 100)


def test_splits_are_by_slide():
    names = split_slides(0, 20)
    assert set(names) == {"train", "validation", "test"}
    samples = list(phantom_samples(0, 64, n_slides=6, tiles_per_slide=3, n_unlabelled_slides=1))
    split_of_patient = {}
    for s in samples:
        assert split_of_patient.setdefault(s.patient_id, s.split) == s.split
    assert {s.split for s in samples} == {"train", "validation", "test", "unlabelled"}
    for s in samples:
        if s.split != "unlabelled":
            assert all(c in s.prompt for c in s.extra["classes"])

import json
from functools import lru_cache

import numpy as np
import pytest

from synthmed.evaluation.memorisation import audit, histogram_data, nearest_neighbours, pixel_embedding

SIZE = 48
N_TRAIN, N_TEST, N_HONEST = 60, 30, 20
RATIO = 0.5  # over 60 seeds, both spaces: honest samples sit at d1/d2 >= 0.67, copies (2 px shift included) <= 0.37


def blob_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 48, 48, 3) uint8 "domain" images: 6-10 coloured Gaussian blobs, bright or dark, on a flat tint."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        img = np.tile(rng.uniform(40, 90, 3), (SIZE, SIZE, 1))
        for _ in range(rng.integers(6, 11)):
            cy, cx = rng.uniform(0, SIZE, 2)
            sigma = rng.uniform(2.5, 8)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))[..., None] * rng.uniform(-40, 140, 3)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) px, filling the exposed border from the edge (no wrap-around)."""
    h, w = img.shape[:2]
    p = np.pad(img, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    return p[abs(dy) - dy : abs(dy) - dy + h, abs(dx) - dx : abs(dx) - dx + w]


def perturb(img: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    """Light edits a re-export or augmentation makes: noise, a 2 px shift, brightness, contrast + noise."""
    x = img.astype(float)
    x = [lambda: x + rng.normal(0, 3, x.shape), lambda: shift(x, 2, 1), lambda: x + 12, lambda: 0.9 * x + 10 + rng.normal(0, 3, x.shape)][kind]()
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@lru_cache(maxsize=None)  # read-only: tests slice or concatenate, never write
def make_sets(seed: int):
    """train, test, synthetic = 4 exact copies + 4 perturbed copies + 20 honest; and the 8 source indices."""
    rng = np.random.default_rng(seed)
    train, test = blob_images(rng, N_TRAIN), blob_images(rng, N_TEST)
    src = rng.choice(N_TRAIN, 8, replace=False)
    perturbed = np.stack([perturb(train[j], k, rng) for k, j in enumerate(src[4:])])
    synthetic = np.concatenate([train[src[:4]], perturbed, blob_images(rng, N_HONEST)])
    return train, test, synthetic, src


def projection_extractor(seed: int = 123, dim: int = 256, flip_invariant: bool = False):
    """A stand-in feature extractor: a fixed random projection of the centred pixels (optionally flip-symmetrised)."""
    w = np.random.default_rng(seed).normal(size=(SIZE * SIZE * 3, dim)) / np.sqrt(dim)

    def extract(images: np.ndarray) -> np.ndarray:
        x = images.astype(float) / 255.0
        x = x + x[:, :, ::-1] if flip_invariant else x  # as if trained with flip augmentation
        x = x.reshape(len(x), -1)
        return (x - x.mean(1, keepdims=True)) @ w  # (N, dim)

    return extract


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exactly_the_copies_are_flagged_and_point_at_their_source(seed):
    train, test, synthetic, src = make_sets(seed)
    r = audit(synthetic, train, test, ratio=RATIO)
    flagged = [rec["flagged"] for rec in r["records"]]
    assert flagged == [True] * 8 + [False] * N_HONEST
    assert [rec["nearest_train_index"] for rec in r["records"][:8]] == src.tolist()
    assert all(rec["rules_fired"] == ["pixel:quantile+ratio"] for rec in r["records"][:8])
    assert r["n_flagged"] == 8 and r["n_synthetic"] == 28 and r["n_test"] == N_TEST and r["n_train"] == N_TRAIN
    assert r["fraction_flagged"] == pytest.approx(8 / 28)
    for rec in r["records"][:4]:  # exact copies: distance 0, not float32 round-off
        assert rec["pixel"]["distance"] < 1e-6
    # the plain quantile rule catches every copy too (it may add a tail-honest sample: that is its nature)
    assert all(rec["flagged"] for rec in audit(synthetic, train, test, ratio=None)["records"][:8])
    json.dumps(r)  # the report layer reads it as JSON


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_flag_the_same_copies(seed):
    train, test, synthetic, src = make_sets(seed)
    extract = projection_extractor()
    feats = dict(synthetic_feats=extract(synthetic), train_feats=extract(train), test_feats=extract(test))
    r = audit(synthetic, train, test, **feats, ratio=RATIO)
    assert r["rule"]["spaces"] == ["pixel", "feature"] and set(r["thresholds"]) == {"pixel", "feature"}
    assert r["n_flagged_per_space"] == {"pixel": 8, "feature": 8}
    assert [rec["flagged"] for rec in r["records"]] == [True] * 8 + [False] * N_HONEST
    assert [rec["feature"]["train_index"] for rec in r["records"][:8]] == src.tolist()
    assert len(r["distances"]["feature"]["synthetic_to_train"]) == 28 and len(r["distances"]["feature"]["test_to_train"]) == N_TEST


def test_a_copy_only_the_feature_space_sees_is_flagged_through_it():
    train, test, synthetic, src = make_sets(0)
    synthetic = np.concatenate([train[src[:1], :, ::-1], synthetic[8:]])  # a mirrored copy: far in pixel space
    extract = projection_extractor(flip_invariant=True)
    r = audit(synthetic, train, test, extract(synthetic), extract(train), extract(test), ratio=RATIO)
    mirrored = r["records"][0]
    assert not mirrored["pixel"]["flagged"] and mirrored["feature"]["flagged"]
    assert mirrored["rules_fired"] == ["feature:quantile+ratio"] and mirrored["nearest_train_index"] == src[0]
    assert r["n_flagged"] == 1


def test_summary_and_histogram_describe_the_two_distributions():
    train, test, synthetic, _ = make_sets(0)
    r = audit(synthetic, train, test, ratio=RATIO)
    s = r["summary"]["pixel"]
    assert s["synthetic_to_train"]["min"] < 1e-6 < s["test_to_train"]["min"]
    honest = audit(synthetic[8:], train, test)["summary"]["pixel"]
    assert 0.2 < honest["p_closer_than_test"] < 0.8  # new-from-the-domain sits like the test set
    assert s["p_closer_than_test"] > honest["p_closer_than_test"]  # copies crowd the training set
    assert r["expected_by_chance"] == pytest.approx(0.01 * 28)
    h = histogram_data(r["distances"]["pixel"]["synthetic_to_train"], r["distances"]["pixel"]["test_to_train"], bins=10, threshold=r["thresholds"]["pixel"])
    assert len(h["edges"]) == 11 and sum(h["synthetic"]) == 28 and sum(h["test"]) == N_TEST


def test_pixel_embedding_ignores_brightness_and_contrast():
    img = blob_images(np.random.default_rng(5), 1)
    edited = np.clip(0.8 * img.astype(float) + 20, 0, 255).astype(np.uint8)
    e = pixel_embedding(np.concatenate([img, edited]), size=16)
    assert e.shape == (2, 16 * 16 * 3)
    assert np.allclose(e.mean(1), 0, atol=1e-6) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.linalg.norm(e[0] - e[1]) < 0.02
    assert not pixel_embedding(np.full((1, 8, 8, 1), 7, np.uint8), size=4).any()  # flat: the zero vector
    many = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)  # more than one chunk
    np.testing.assert_allclose(pixel_embedding(many, size=4), np.concatenate([pixel_embedding(m[None], size=4) for m in many]), atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_neighbours_equals_brute_force(metric, dtype):
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(23, 7)).astype(dtype), rng.normal(size=(41, 7)).astype(dtype)
    if metric == "l2":
        full = np.linalg.norm(q[:, None].astype(float) - r[None].astype(float), axis=2)
    else:
        full = 1 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T
    want_i = np.argsort(full, axis=1)[:, :3]
    dist, idx = nearest_neighbours(q, r, k=3, metric=metric, chunk=5)  # chunks of 5, last one partial
    assert dist.shape == idx.shape == (23, 3)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(dist, np.take_along_axis(full, want_i, 1), rtol=1e-4, atol=1e-5)
    assert nearest_neighbours(r[:4], r, metric=metric)[0].max() < 1e-3  # self-matches


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, tr, te: audit(s[..., :1], tr, te), r"\(28, 48, 48, 1\)"),
        (lambda s, tr, te: audit(s, tr[:, :32], te), r"\(60, 32, 48, 3\)"),
        (lambda s, tr, te: audit(s, tr, te[:0]), r"\(0, 48, 48, 3\)"),
        (lambda s, tr, te: audit(s, tr, te.astype(float)), "uint8"),
        (lambda s, tr, te: audit(s, tr, te, np.zeros((28, 4)), np.zeros((60, 4)), None), r"missing"),
        (lambda s, tr, te: audit(s, tr, te, np.zeros((28, 4)), np.zeros((60, 5)), np.zeros((30, 4))), r"\(60, 5\)"),
        (lambda s, tr, te: audit(s, tr, te, np.zeros((27, 4)), np.zeros((60, 4)), np.zeros((30, 4))), r"\(27, 4\)"),
        (lambda s, tr, te: audit(s, tr, te, quantile=1.5), "quantile"),
        (lambda s, tr, te: audit(s, tr, te, ratio=0.0), "ratio"),
        (lambda s, tr, te: audit(s, tr, te, feature_metric="dot"), "'dot'"),
        (lambda s, tr, te: nearest_neighbours(np.zeros((3, 4)), np.zeros((5, 6))), r"\(3, 4\) and \(5, 6\)"),
        (lambda s, tr, te: nearest_neighbours(np.zeros((0, 4)), np.zeros((5, 4))), r"\(0, 4\)"),
        (lambda s, tr, te: nearest_neighbours(np.zeros((3, 4)), np.zeros((5, 4)), k=6), "k = 6"),
        (lambda s, tr, te: nearest_neighbours(np.zeros((3, 4)), np.zeros((5, 4)), metric="l1"), "'l1'"),
        (lambda s, tr, te: histogram_data([], [1.0]), "non-empty"),
    ],
)
def test_bad_input_raises_naming_the_shapes(call, match):
    train, test, synthetic, _ = make_sets(0)
    with pytest.raises(ValueError, match=match):
        call(synthetic, train, test)


def test_flags_are_split_by_whether_the_copied_image_is_the_layout_source():
    """A mask-conditioned sample near its own layout source is counted apart from one near another training image."""
    from types import SimpleNamespace

    from synthmed.evaluation.sections import memorisation

    rng = np.random.default_rng(11)
    train, test, honest = blob_images(rng, N_TRAIN), blob_images(rng, N_TEST), blob_images(rng, 6)
    syn = np.concatenate([train[[3, 7]], train[[10]], honest])  # copies of 3 and 7, of 10; then honest samples
    sources = np.array([3, 7, 40] + list(range(20, 26)))  # samples 0, 1 drawn from the copied image's mask, sample 2 from another
    cfg = SimpleNamespace(memorisation_quantile=0.01, memorisation_ratio=RATIO)
    m = memorisation(syn, train, test, {}, cfg, sources=sources)
    assert [r["index"] for r in m["records"] if r["flagged"]] == [0, 1, 2]
    assert m["n_flagged_layout_source"] == 2 and m["n_flagged_other_image"] == 1
    assert [r["shown_is_layout_source"] for r in m["records"][:3]] == [True, True, False]
    assert m["records"][2]["nearest_is_layout_source"] == {"pixel": False}

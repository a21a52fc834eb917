import numpy as np
import pytest
import torch

from synthmed.evaluation import downstream as ds


def _seg_pool(n: int, seed: int, size: int = 32) -> ds.Pool:
    """Bright squares (class 1) and dim discs (class 2) on black: a segmentation a U-Net learns in a few steps."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        y, x = rng.integers(4, size - 12, 2)
        masks[i, y : y + 8, x : x + 8] = 1
        cy, cx = rng.integers(6, size - 6, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 16
        masks[i][disc & (masks[i] == 0)] = 2
    images[masks == 1] = 230
    images[masks == 2] = 110
    return ds.Pool(images, masks)


def test_arms_draw_from_the_right_pools():
    real, syn, held, oracle = _seg_pool(4, 0), _seg_pool(6, 1), _seg_pool(5, 2), _seg_pool(3, 3)
    extras = {"synthetic": syn, "heldout": held, "oracle": oracle}
    assert ds.arm_pools("real", real, syn) == ([real], False)
    assert ds.arm_pools("real+classic", real, None) == ([real], True)
    assert ds.arm_pools("real+synthetic", real, syn) == ([real, syn], False)
    assert ds.arm_pools("synthetic-only", real, syn) == ([syn], False)
    assert ds.arm_pools("real+classic+synthetic", real, extras) == ([real, syn], True)
    assert ds.arm_pools("real+synthetic+classic", real, syn) == ([real, syn], True)  # the earlier name
    assert ds.arm_pools("real+heldout", real, extras) == ([real, held], False)
    assert ds.arm_pools("real+classic+heldout", real, extras) == ([real, held], True)
    assert ds.arm_pools("real+classic+oracle", real, extras) == ([real, oracle], True)
    assert ds.arm_pools("synthetic-pretrain", real, extras) == ([real], True)  # fine-tuning pools; pre-training is on syn
    assert ds.arm_pools("real-pretrain", real, extras) == ([real], True) and ds.arm_of("real-pretrain").pretrain
    with pytest.raises(ValueError, match="synthetic pool"):
        ds.arm_pools("real+synthetic", real, None)
    with pytest.raises(ValueError, match="oracle pool"):
        ds.arm_pools("real+oracle", real, {"synthetic": syn})
    with pytest.raises(ValueError, match="arm in"):
        ds.arm_pools("real+gan", real, syn)


def test_every_arm_is_measured_against_its_practitioners_baseline():
    assert ds.arm_of("real").baseline is None
    assert ds.arm_of("real+classic").baseline == "real"
    assert ds.arm_of("real+synthetic").baseline == "real" and ds.arm_of("real+oracle").baseline == "real"
    for arm in ("real+classic+synthetic", "real+classic+heldout", "real+classic+oracle", "synthetic-pretrain"):
        assert ds.arm_of(arm).baseline == "real+classic"


def test_mixing_share_and_determinism():
    real = ds.Pool(np.zeros((10, 4, 4, 3), np.uint8), np.zeros(10, np.int64))
    syn = ds.Pool(np.full((30, 4, 4, 3), 255, np.uint8), np.ones(30, np.int64))
    share = np.mean([ds.draw([real, syn], 16, s, 0, 0.25, False)[1].mean() for s in range(400)])
    assert share == pytest.approx(0.25, abs=0.02)
    by_size = np.mean([ds.draw([real, syn], 16, s, 0, None, False)[1].mean() for s in range(400)])
    assert by_size == pytest.approx(0.75, abs=0.02)  # None: in proportion to the pools (30 of 40)
    a, b = ds.draw([real, syn], 16, 7, 3, 0.5, False), ds.draw([real, syn], 16, 7, 3, 0.5, False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_class_balanced_draws_reach_the_rare_label():
    labels = np.array([0] * 95 + [1] * 5)
    pool = ds.Pool(np.zeros((100, 4, 4, 3), np.uint8), labels)
    rare = np.mean([ds.draw([pool], 16, s, 0, None, True)[1].mean() for s in range(300)])
    assert rare == pytest.approx(0.5, abs=0.05)


def test_classic_augmentation_moves_image_and_mask_together():
    pool = _seg_pool(32, 2)
    x = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(pool.targets.astype(np.int64))[:, None]
    aug = ds.ClassicAugmentation()
    xa, ya = aug(x, y, seed=0, step=1)
    assert xa.shape == x.shape and ya.shape == y.shape and set(ya.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(xa, x) and not torch.equal(ya, y)
    bright = xa[:, 0] > 0.75  # square pixels (230 / 255 before intensity jitter)
    assert (ya[:, 0][bright] == 1).float().mean() > 0.9  # the mask went where the image went
    xb, yb = aug(x, y, seed=0, step=1)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # a pure function of (seed, step)
    assert not torch.equal(aug(x, y, seed=0, step=2)[0], xa)


def test_flips_and_quarter_turns_are_exact():
    pool = _seg_pool(64, 5)
    x = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(pool.targets.astype(np.int64))[:, None]
    geometric = ds.ClassicAugmentation(p_affine=0, p_noise=0, p_contrast=0, p_intensity=0)
    xa, ya = geometric(x, y, seed=3, step=0)
    views = [torch.rot90(t, k, (-2, -1)) for t in (y, y.flip(-1)) for k in range(4)]
    used = set()
    for i in range(len(x)):  # every output is one of the 8 dihedral views of its input, image and mask alike
        k = next(j for j, v in enumerate(views) if torch.equal(v[i], ya[i]))
        img_view = torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, (-2, -1))[i]
        assert torch.equal(img_view, xa[i])
        used.add(k)
    assert len(used) >= 6  # the draws reach (nearly) all 8 views


def test_early_stopping_keeps_the_best_weights():
    train, val = _seg_pool(24, 3), _seg_pool(8, 4)
    settings = ds.TrainSettings(max_steps=60, eval_every=5, patience=2, batch_size=8, lr=3e-3)
    model, record = ds.train_cell("segmentation", [train], False, val, 2, settings, seed=0)
    assert record["curve"] and record["best_val_score"] == max(c["val_score"] for c in record["curve"])
    assert record["best_val_score"] == pytest.approx(ds.validation_score("segmentation", model, val, 2))
    if record["early_stopped"]:
        assert record["stopped_at"] - record["best_step"] == settings.patience * settings.eval_every
    assert record["best_val_score"] > 0.3  # it learnt the two shapes


def test_leakage_rules():
    allowed, held_out = {"a", "b"}, {"v1", "t1"}
    ok = [{"id": "s0", "provenance": {"source_mask_id": "a", "layout": {"ops": [{"donor_id": "b"}]}}}]
    assert ds.leakage(ok, ["a", "b"], allowed, held_out) is None
    assert "validation/test" in ds.leakage([{"id": "s", "provenance": {"source_mask_id": "v1"}}], ["a"], allowed, held_out)
    assert "outside this fraction" in ds.leakage([{"id": "s", "provenance": {"source_mask_id": "a", "layout": {"ops": [{"donor_id": "c"}]}}}], ["a"], allowed, held_out)
    assert "trained on 3 samples" in ds.leakage(ok, ["a", "b", "c"], allowed, held_out)
    assert "does not list" in ds.leakage(ok, None, allowed, held_out)
    assert "'test' split" in ds.leakage([{"id": "s", "provenance": {"source_mask_id": "a", "source_split": "test"}}], ["a"], allowed, held_out)
    assert "no provenance" in ds.leakage([{"id": "s"}], ["a"], allowed, held_out)


def test_synthetic_pretraining_then_real_fine_tuning():
    train, syn, val = _seg_pool(16, 6), _seg_pool(16, 7), _seg_pool(8, 8)
    settings = ds.TrainSettings(max_steps=6, eval_every=3, patience=5, batch_size=4, lr=3e-3, pretrain_steps=4)
    seen = []
    model, record = ds.train_cell("segmentation", [train], True, val, 2, settings, seed=0, pretrain=syn, progress=lambda s, n, loss: seen.append(n))
    assert record["pretrain_steps"] == 4 and seen == [4] * 4 + [6] * 6  # 4 steps on the synthetic pool, then 6 on the real one
    assert [c["step"] for c in record["curve"]] == [3, 6]  # early stopping watches the fine-tuning only


def test_a_cell_whose_forward_fails_to_compile_trains_eagerly_with_a_note(monkeypatch, capsys):
    train, val = _seg_pool(16, 3), _seg_pool(8, 4)

    def cannot_compile(model):
        def forward(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(long inductor report)")
        return forward

    monkeypatch.setattr(torch, "compile", cannot_compile)
    settings = ds.TrainSettings(max_steps=6, eval_every=3, patience=5, batch_size=4, lr=3e-3)
    eager, eager_record = ds.train_cell("segmentation", [train], False, val, 2, settings, seed=0)
    settings.compile = True
    fallback, record = ds.train_cell("segmentation", [train], False, val, 2, settings, seed=0)
    assert record["compiled"] is False and "compiled" not in eager_record
    assert capsys.readouterr().err.count("note: torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found); training eagerly") == 1
    # eager from the first step on: the very same model as a cell that never asked for compile
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fallback.state_dict().values()))


@pytest.mark.e2e
def test_a_compiled_cell_learns_what_an_eager_one_does():
    """torch.compile's kernels: the same function with other rounding (a real compile: tens of seconds when the cache is cold)."""
    train, val = _seg_pool(24, 3), _seg_pool(8, 4)
    records = {}
    for compiled in (False, True):
        settings = ds.TrainSettings(max_steps=40, eval_every=10, patience=5, batch_size=8, lr=3e-3, compile=compiled)
        _, records[compiled] = ds.train_cell("segmentation", [train], False, val, 2, settings, seed=0)
    assert records[True]["compiled"] is True
    eager, fast = ([c["train_loss"] for c in records[k]["curve"]] for k in (False, True))
    assert fast == pytest.approx(eager, rel=0.05) and fast != eager  # the same training, not bit for bit

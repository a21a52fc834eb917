"""Fine-tuning the VAE decoder towards rare classes: the decoder learns, the encoder (and the latents) do not move."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from synthmed.training.decoder import FocusPixels, decoder_batch, finetune_decoder, train_refiner


def _cfg(**kw):
    return SimpleNamespace(**(dict(steps=3, batch_size=4, crop=16, lr=1e-3, focus_share=0.5, checkpoint_every=2, seed=0, compile=False) | kw))


def test_focused_crops_hold_the_weighted_class_and_carry_its_weights():
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[1, 20:23, 5:8] = 4  # one small rare object in one image
    weights = torch.tensor([1.0, 1, 1, 1, 20.0, 1])
    focus = FocusPixels(masks, weights)
    assert len(focus) == 1 and focus.weights() == [20.0] and focus.count(0) == 9
    assert [focus.pixel(0, j) for j in range(9)] == [tuple(p) for p in np.argwhere(masks == 4)]  # argwhere's order, one mask read each
    images = np.zeros((3, 32, 32, 3), np.uint8)
    images[1, 20:23, 5:8] = 255
    x, w, _ = decoder_batch(images, masks, weights, focus, 8, 16, 0.5, np.random.default_rng(0))
    assert x.shape == (8, 3, 16, 16) and w.shape == (8, 1, 16, 16)
    # the first half is centred near the rare object: every one of those crops holds it, with its weight
    assert all((w[i] == 20.0).sum() == 9 and (x[i] == 1.0).all(0).sum() == 9 for i in range(4))
    # no weighted class: plain random crops only
    x2, w2, _ = decoder_batch(images, None, None, None, 8, 16, 0.5, np.random.default_rng(0))
    assert (w2 == 1).all() and x2.shape == (8, 3, 16, 16)


def test_focus_pixels_are_found_across_chunks_like_argwhere():
    rng = np.random.default_rng(3)
    masks = rng.choice(6, size=(11, 9, 9), p=[0.6, 0.1, 0.1, 0.1, 0.02, 0.08]).astype(np.uint8)
    focus = FocusPixels(masks, torch.tensor([1.0, 2, 1, 1, 20, 1]), chunk=4)
    assert focus.weights() == [2.0, 20.0]
    for i, code in enumerate((1, 4)):
        where = np.argwhere(masks == code)
        assert focus.count(i) == len(where)
        assert all(focus.pixel(i, j) == tuple(where[j]) for j in range(len(where)))


def test_the_fine_tune_reads_a_disk_split_by_rows_and_learns_the_same(tiny, tmp_path):
    """A split on disk (never read whole) gives the decoder the same batches, hence the same losses and weights."""
    from synthmed.data.arrays import DiskArray

    class RowsOnly(DiskArray):
        def __array__(self, dtype=None, copy=None):
            raise AssertionError(f"{self.path.name} was read whole")

    load, arrays = tiny
    weights = torch.tensor([1.0, 1, 1, 1, 20.0, 1])
    np.save(tmp_path / "images.npy", arrays["images"])
    np.save(tmp_path / "masks.npy", arrays["masks"])
    mem, disk = load(), load()
    want = finetune_decoder(mem, arrays["images"], arrays["masks"], weights, _cfg())
    got = finetune_decoder(disk, RowsOnly(tmp_path / "images.npy"), RowsOnly(tmp_path / "masks.npy"), weights, _cfg())
    assert got == want
    assert all(torch.equal(v, mem.vae.state_dict()[k]) for k, v in disk.vae.state_dict().items())


def test_the_decoder_learns_while_the_encoder_and_latents_stay(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    before = {k: v.clone() for k, v in bb.vae.state_dict().items()}
    x = torch.from_numpy(arrays["images"][:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    z0 = bb.vae.encode(x).latent_dist.mean
    weights = torch.tensor([1.0, 1, 1, 1, 20.0, 1])
    losses = finetune_decoder(bb, arrays["images"], arrays["masks"], weights, _cfg(), state_dir=tmp_path / "state")
    after = bb.vae.state_dict()
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert torch.equal(bb.vae.encode(x).latent_dist.mean, z0) and not any(p.requires_grad for p in bb.vae.parameters())
    # resumable: the finished phase restores from its checkpoint and does not train again
    again = load()
    assert finetune_decoder(again, arrays["images"], arrays["masks"], weights, _cfg(), state_dir=tmp_path / "state") == losses
    assert all(torch.equal(after[k], v) for k, v in again.vae.state_dict().items())


def test_interrupted_then_resumed_equals_uninterrupted(tiny, tmp_path):
    load, arrays = tiny
    whole = load()
    finetune_decoder(whole, arrays["images"], None, None, _cfg(steps=4))

    def stop_after_two(done, total, loss):
        if done == 2:
            raise KeyboardInterrupt

    part = load()
    try:
        finetune_decoder(part, arrays["images"], None, None, _cfg(steps=4), progress=stop_after_two, state_dir=tmp_path / "s")
    except KeyboardInterrupt:
        pass
    assert torch.load(tmp_path / "s" / "decoder.pt", weights_only=True)["step"] == 2
    resumed = load()
    finetune_decoder(resumed, arrays["images"], None, None, _cfg(steps=4), state_dir=tmp_path / "s")
    want = whole.vae.state_dict()
    assert all(torch.allclose(v, want[k], atol=1e-6) for k, v in resumed.vae.state_dict().items())


def test_focused_crops_carry_their_conditioning_in_the_same_view():
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[1, 20:23, 5:8] = 4
    cond = (masks[..., None] == 4).astype(np.uint8) * 255  # (N, H, W, 1): the rare class lit
    images = np.zeros((3, 32, 32, 3), np.uint8)
    x, w, c = decoder_batch(images, masks, torch.tensor([1.0, 1, 1, 1, 20.0, 1]), FocusPixels(masks, torch.tensor([1.0, 1, 1, 1, 20.0, 1])),
                            8, 16, 1.0, np.random.default_rng(0), cond=cond)
    assert c.shape == (8, 1, 16, 16) and torch.equal(c[:, 0] == 1.0, w[:, 0] == 20.0)  # crop and dihedral view match the weights'


def test_the_refiner_learns_to_paint_what_the_round_trip_loses_and_resumes(tiny, tmp_path):
    """Tiny red squares the (untrained, tiny) VAE blurs away: the refiner, seeing where they are, paints them back."""
    from synthmed.evaluation.roundtrip import reconstruct
    from synthmed.models.refiner import ConditionedRefiner

    load, _ = tiny
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 32, 32), np.uint8)
    for m in masks:
        for _ in range(4):
            y, x = rng.integers(0, 29, 2)
            m[y : y + 3, x : x + 3] = 4
    images = np.full((6, 32, 32, 3), 128, np.uint8)
    images[masks == 4] = (255, 0, 0)
    cond = (masks[..., None] == 4).astype(np.uint8) * 255
    weights = torch.tensor([1.0, 1, 1, 1, 20.0, 1])
    cfg = _cfg(steps=40, batch_size=8, crop=16, lr=1e-2, width=16, depth=3, latent_noise=0.5)
    bb = load()
    refiner, losses, _ = train_refiner(bb, images, masks, cond, weights, cfg, state_dir=tmp_path / "state")
    assert isinstance(refiner, ConditionedRefiner) and len(losses) == 40 and not any(p.requires_grad for p in refiner.parameters())
    assert list(reconstruct(bb, images, cond=cond)) == ["round trip"]  # no refiner on the backbone: nothing to refine
    bb.refiner = refiner
    both = reconstruct(bb, images, cond=cond)
    plain, refined = both["round trip"], both["refined"]
    err = lambda rec: np.abs(rec.astype(float) - images.astype(float)).mean(-1)[masks == 4].mean()  # noqa: E731
    assert err(refined) < 0.5 * err(plain)
    again, resumed, _ = train_refiner(load(), images, masks, cond, weights, cfg, state_dir=tmp_path / "state")  # finished: restored, not retrained
    assert resumed == losses and all(torch.equal(v, refiner.state_dict()[k]) for k, v in again.state_dict().items())


def test_a_refiner_of_whole_image_crops_starts_from_cached_latents_and_learns_the_same(tiny, tmp_path, monkeypatch):
    """Whole-image crops: the round trips start from the latent cache's 8 views (no encode in a step), and the
    refiner trains as it does encoding each batch (the same means, another batch composition's rounding)."""
    from synthmed.training.latent_cache import cached_latents

    load, _ = tiny
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 6, (5, 16, 16)).astype(np.uint8)
    images = rng.integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    cond = (masks[..., None] == 4).astype(np.uint8) * 255
    weights = torch.tensor([1.0, 1, 1, 1, 20.0, 1])
    cfg = _cfg(steps=6, batch_size=4, crop=16, lr=1e-2, width=8, depth=3, latent_noise=0.5)
    encoding, _, _ = train_refiner(load(), images, masks, cond, weights, cfg)
    bb = load()
    store, _ = cached_latents(bb, images, tuple(range(8)), tmp_path / "latents")
    monkeypatch.setattr(bb.vae, "encode", lambda *a, **k: pytest.fail("a step encoded its batch instead of reading the cache"))
    cached, losses, _ = train_refiner(bb, images, masks, cond, weights, cfg, latents=store)
    assert len(losses) == 6 and any(v.abs().sum() > 0 for v in cached.out.state_dict().values())  # trained
    want = encoding.state_dict()
    assert all(torch.allclose(v, want[k], atol=1e-4) for k, v in cached.state_dict().items())
    with pytest.raises(ValueError, match="whole square images"):  # 8 px crops of 16 px images: the cache does not hold them
        train_refiner(load(), images, masks, cond, weights, _cfg(steps=1, crop=8, width=8, depth=3, latent_noise=0.5), latents=store)


def _refiner_case():
    rng = np.random.default_rng(2)
    masks = rng.integers(0, 6, (5, 16, 16)).astype(np.uint8)
    images = rng.integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    return images, masks, (masks[..., None] == 4).astype(np.uint8) * 255, torch.tensor([1.0, 1, 1, 1, 20.0, 1])


def test_a_refiner_that_fails_to_compile_trains_eagerly_with_a_note_and_says_so(tiny, monkeypatch, capsys):
    load, _ = tiny
    images, masks, cond, weights = _refiner_case()
    cfg = _cfg(steps=4, batch_size=4, crop=16, lr=1e-2, width=8, depth=3, latent_noise=0.5)
    eager, _, record = train_refiner(load(), images, masks, cond, weights, cfg)
    assert record == {}  # not asked: nothing recorded

    def cannot_compile(model):
        def forward(*inputs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return forward

    monkeypatch.setattr(torch, "compile", cannot_compile)
    fallback, _, record = train_refiner(load(), images, masks, cond, weights, _cfg(**{**vars(cfg), "compile": True}))
    assert record == {"compiled": False}
    assert capsys.readouterr().err.count("note: torch.compile failed (RuntimeError: InvalidCxxCompiler") == 1
    # eager from its first step, channels-last: the same refiner up to that layout's rounding, handed back in the default layout
    assert all(v.is_contiguous() for v in fallback.state_dict().values())
    want = eager.state_dict()
    assert all(torch.allclose(v, want[k], atol=1e-5) for k, v in fallback.state_dict().items())


@pytest.mark.e2e
def test_a_compiled_refiner_learns_what_an_eager_one_does(tiny):
    """A real compile (tens of seconds when inductor's cache is cold): the same training with other rounding."""
    load, _ = tiny
    images, masks, cond, weights = _refiner_case()
    cfg = _cfg(steps=8, batch_size=4, crop=16, lr=1e-2, width=8, depth=3, latent_noise=0.5)
    _, eager, _ = train_refiner(load(), images, masks, cond, weights, cfg)
    refiner, fast, record = train_refiner(load(), images, masks, cond, weights, _cfg(**{**vars(cfg), "compile": True}))
    assert record == {"compiled": True} and all(v.is_contiguous() for v in refiner.state_dict().values())
    assert fast == pytest.approx(eager, rel=0.02)

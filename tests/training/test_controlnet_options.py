"""The training options of the loop: each one changes what it should and nothing else."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from synthmed.models.controlnet import ControlledUNet, apply_depth, build_controlnet, residual_blocks
from synthmed.models.lora import add_lora
from synthmed.testing.training import cfg, close, data_for, run_training
from synthmed.training.common import DiffusionLoss, latent_weights
from synthmed.training.controlnet import latest_checkpoint, make_optimizer, train


def _cn(model):
    return model.controlnet.state_dict()


def test_uncached_encoding_trains_the_same_model(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    cached, uncached = data_for(bb, arrays), data_for(bb, arrays, cache=False)
    assert cached.cached and not uncached.cached
    a, la = run_training(bb, cached, tmp_path / "a")
    b, lb = run_training(load(), uncached, tmp_path / "b")
    assert close(_cn(a), _cn(b)) and la == pytest.approx(lb, rel=1e-4)


def test_gradient_accumulation_equals_the_full_batch(tiny, tmp_path):
    load, arrays = tiny
    data = data_for(load(), arrays)
    a, la = run_training(load(), data, tmp_path / "a")
    b, lb = run_training(load(), data, tmp_path / "b", grad_accum=2)
    # Summation order differs, and Adam divides tiny gradients by their own size, so weights agree
    # to a fraction of one lr step (1e-3); the losses of the later steps (which see those weights) agree closely.
    assert la == pytest.approx(lb, rel=1e-5) and close(_cn(a), _cn(b), atol=1e-3)
    with pytest.raises(ValueError, match="divisible by grad_accum"):
        run_training(load(), data, tmp_path / "c", grad_accum=3)


def test_class_weights_reach_the_loss_on_the_latent_grid(tiny, tmp_path):
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, 0, 0] = 4  # one rare pixel in the top-left 4 x 4 block
    w = latent_weights(masks, torch.tensor([1.0, 1, 1, 1, 17.0, 1]), factor=4)
    assert w.shape == (1, 2, 2) and w[0, 0, 0] == pytest.approx(2.0) and w[0, 1, 1] == 1.0
    load, arrays = tiny
    data = data_for(load(), arrays)
    plain, _ = run_training(load(), data, tmp_path / "a")
    uniform, _ = run_training(load(), data, tmp_path / "b", class_weights=torch.ones(6))
    rare, _ = run_training(load(), data, tmp_path / "c", class_weights=torch.tensor([1.0, 1, 1, 1, 50.0, 1]))
    assert close(_cn(plain), _cn(uniform)) and not close(_cn(plain), _cn(rare))


def test_min_snr_weights_and_pixel_weights_scale_the_loss(tiny):
    bb = tiny[0]()
    loss = DiffusionLoss(bb.scheduler, min_snr_gamma=5.0)
    w = loss.snr_weights(torch.tensor([0, 500, 999]))
    assert (w <= 1).all() and w[2] == pytest.approx(1.0) and w[0] < 0.01  # low noise (high SNR) is down-weighted
    lat = torch.randn(2, 4, 4, 4)
    plain = DiffusionLoss(bb.scheduler)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = plain(lambda x, t: torch.zeros_like(x), lat, g())
    doubled = plain(lambda x, t: torch.zeros_like(x), lat, g(), pixel_weights=torch.full((2, 4, 4), 2.0))
    assert doubled == pytest.approx(2 * base)


def test_mask_mode_ignores_prompts(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    data = data_for(bb, arrays)
    other = replace(data, prompt_index=torch.zeros(len(data), dtype=torch.long), prompts=["x"], prompt_table=bb.encode_prompts(["x", ""]))
    a, _ = run_training(bb, data, tmp_path / "a", conditioning_mode="mask")
    b, _ = run_training(load(), other, tmp_path / "b", conditioning_mode="mask")  # same images, other prompts
    c, _ = run_training(load(), data, tmp_path / "c")
    assert close(_cn(a), _cn(b)) and not close(_cn(a), _cn(c))


@pytest.mark.parametrize("depth, kept_blocks, mid", [("mid", 0, True), ("shallow:1", 1, False), ("deep", 3, True)])
def test_depth_trains_only_the_residuals_it_keeps(tiny, tmp_path, depth, kept_blocks, mid):
    load, arrays = tiny
    model, _ = run_training(load(), data_for(load(), arrays), tmp_path, depth=depth)
    cn = model.controlnet
    for conv, block in zip(cn.controlnet_down_blocks, residual_blocks(cn.config)):
        assert (conv.weight.abs().sum() > 0) == (block < kept_blocks) and conv.weight.requires_grad == (block < kept_blocks)
    assert (cn.controlnet_mid_block.weight.abs().sum() > 0) == mid
    assert cn.config.synthmed_depth == depth


def test_warm_start_depth_zeroes_what_it_drops(tiny, tmp_path):
    load, _ = tiny
    bb = load()
    full = build_controlnet(bb.unet, bb.vae_scale_factor)
    with torch.no_grad():
        for p in full.controlnet_mid_block.parameters():
            p.fill_(0.5)
    full.save_pretrained(tmp_path / "cn")
    warm = build_controlnet(bb.unet, bb.vae_scale_factor, init=tmp_path / "cn")
    assert warm.controlnet_mid_block.weight.eq(0.5).all()
    shallow = build_controlnet(bb.unet, bb.vae_scale_factor, depth="shallow:2", init=tmp_path / "cn")
    assert shallow.controlnet_mid_block.weight.eq(0).all() and not shallow.mid_block.resnets[0].conv1.weight.requires_grad
    with pytest.raises(Exception, match="conditioning channels"):
        build_controlnet(bb.unet, bb.vae_scale_factor, conditioning_channels=1, init=tmp_path / "cn")
    with pytest.raises(ValueError, match="shallow:K expects 1 <= K <= 3"):
        apply_depth(full, "shallow:4")


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tiny, tmp_path, monkeypatch):
    load, arrays = tiny
    real = DiffusionLoss.__call__
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        out = real(self, *a, **kw)
        return out * float("inf") if calls["n"] == 3 else out

    monkeypatch.setattr(DiffusionLoss, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match="loss is (inf|nan) at step 3; last good checkpoint kept"):
        run_training(load(), data_for(load(), arrays), tmp_path, steps=4, checkpoint_every=1)
    assert latest_checkpoint(tmp_path)[0] == 2


def test_ema_is_the_saved_model_and_resumes_exactly(tiny, tmp_path):
    load, arrays = tiny
    data = data_for(load(), arrays)
    raw, _ = run_training(load(), data, tmp_path / "raw", steps=4)
    ema, _ = run_training(load(), data, tmp_path / "ema", steps=4, ema_decay=0.5)
    assert not close(_cn(raw), _cn(ema))

    def crash(done, total, loss):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(load(), data, tmp_path / "r", steps=4, ema_decay=0.5, checkpoint_every=2, progress=crash)
    assert (tmp_path / "r" / "step-2" / "ema.safetensors").is_file()
    resumed, _ = run_training(load(), data, tmp_path / "r", steps=4, ema_decay=0.5, checkpoint_every=2, resume=True)
    assert close(_cn(ema), _cn(resumed))


def test_joint_lora_trains_adapters_and_controlnet_not_the_base_unet(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    data = data_for(bb, arrays)
    base = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    torch.manual_seed(0)
    controlnet = build_controlnet(bb.unet, bb.vae_scale_factor)  # copied from the UNet before it has adapters
    lora = add_lora(bb.unet, rank=2)
    before = [p.detach().clone() for p in lora]
    model = ControlledUNet(bb.unet, controlnet)
    train(model, bb, data, cfg(), Accelerator(cpu=True), tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(before, lora))
    after = {k.replace(".base_layer", ""): v for k, v in bb.unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys() and all(torch.equal(after[k], v) for k, v in base.items())  # base weights untouched
    saved = set(load_file(tmp_path / "step-3" / "model.safetensors"))
    assert any("lora_" in k for k in saved) and any(k.startswith("controlnet.") for k in saved)


def test_text_mode_trains_the_unet_alone(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    data = data_for(bb, arrays)
    data = replace(data, conditioning=None)
    before = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    bb.unet.requires_grad_(True)
    model, losses = run_training(bb, data, tmp_path, controlnet=False)
    assert model.controlnet is None and not close(before, bb.unet.state_dict(), atol=0)


def test_8bit_adam_needs_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="bitsandbytes"):
            make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], "adamw8bit")
    else:
        pytest.skip("bitsandbytes installed")


def test_crops_rescaling_and_views_move_image_conditioning_and_mask_together(tiny):
    from synthmed.training.batches import Augment, build_training_data

    load, _ = tiny
    rng = np.random.default_rng(0)
    masks = np.kron(rng.integers(0, 3, (4, 8, 8)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)  # (4, 64, 64) blocks
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    images = palette[masks]  # the image *is* the mask's colouring, so any misalignment shows
    data = build_training_data(load(), images, images.copy(), ["p"] * 4, masks=masks, cache=False, crop=(32, 48), scale=(0.75, 1.5))
    aug = data.draw(4, torch.Generator().manual_seed(3))
    aug = Augment(torch.tensor([1, 5, 2, 7]), aug.scales, aug.offsets)
    for i in range(4):
        image, cond, mask = data._augmented(i, int(aug.views[i]), float(aug.scales[i]), aug.offsets[i])
        assert image.shape == (3, 32, 48) and cond.shape == (3, 32, 48) and mask.shape == (32, 48)
        from_image = (image[:2] > 0).float()  # channels R, G in [-1, 1] -> class 1, 2
        agree = (torch.stack([(mask == 1).float(), (mask == 2).float()]) == from_image).float().mean()
        assert agree > 0.97  # bilinear image vs nearest mask differ only on block edges
        assert torch.equal(cond[:2].float().div(255).round(), torch.stack([(mask == 1).float(), (mask == 2).float()]))


def test_non_square_images_draw_only_shape_keeping_views_and_train(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    narrow = {k: (v[:, :, :48] if k != "prompts" else v) for k, v in arrays.items()}  # 64 x 48
    data = data_for(bb, narrow)
    assert data.views == (0, 2, 4, 6) and data.latents.shape[1:] == (4, 4, 16, 12)
    _, losses = run_training(bb, data, tmp_path)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert data_for(bb, narrow, flips=False).views == (0,)


@pytest.mark.parametrize("most,square,narrow", [(1, (0,), (0,)), (2, (0, 4), (0, 4)), (4, (0, 2, 4, 6), (0, 2, 4, 6)), (8, tuple(range(8)), (0, 2, 4, 6))])
def test_fewer_views_are_drawn_and_cached_when_asked(tiny, most, square, narrow):
    """augment.views: the image, its mirror image, their 180-degree turns, then the rest; the cache holds only those."""
    load, arrays = tiny
    data = data_for(load(), arrays, views=most)
    assert data.views == square and data.latents.shape[1] == len(square)
    assert data_for(load(), {k: (v[:, :, :48] if k != "prompts" else v) for k, v in arrays.items()}, views=most).views == narrow
    drawn = data.draw(64, torch.Generator().manual_seed(0)).views
    assert set(drawn.tolist()) == set(square)  # the loop draws only cached views


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_loss_target_follows_the_schedulers_prediction_type(kind):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    lat, noise, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([10, 500, 990])
    expected = {"epsilon": noise, "v_prediction": sched.get_velocity(lat, noise, t), "sample": lat}[kind]
    loss = DiffusionLoss(sched, min_snr_gamma=5.0)
    assert loss(lambda noisy, ts: expected, lat, noise=noise, timesteps=t) == 0
    assert loss(lambda noisy, ts: torch.zeros_like(lat), lat, noise=noise, timesteps=t) > 0

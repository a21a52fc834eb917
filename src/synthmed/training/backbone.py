"""Pretraining the tiny backbone: the VAE on image crops, then the text-to-image UNet on latents.

Real users start from a pretrained SD backbone; this exists so the embedded default has one
that was trained reproducibly on the unlabelled phantom images, and ships inside the package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synthmed.models.backbone import Backbone
from synthmed.training.common import batch_indices, DiffusionLoss, dihedral, drop_prompts, optimiser_step, PhaseCheckpoint, step_generator, to_model_range


def _one_cycle(opt, lr: float, steps: int):
    """One-cycle schedule with 5% warm-up (at least 2 steps); constant for runs too short for a cycle."""
    if steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    pct = max(0.05, 2 / steps)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct)


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between image gradients: penalises the blur that plain L1 tolerates."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def _random_crops(images, idx: torch.Tensor, crop: int, g: torch.Generator) -> torch.Tensor:
    """Random crops of a batch of (N, H, W, 3) uint8 images (the VAE is convolutional, so crops train it at a
    quarter of the cost), in [-1, 1]; only the batch's rows are read (the images may be a split on disk)."""
    h, w = images.shape[1:3]
    ys = torch.randint(0, h - crop + 1, (len(idx),), generator=g)
    xs = torch.randint(0, w - crop + 1, (len(idx),), generator=g)
    rows = to_model_range(images[idx.numpy()])  # (B, 3, H, W)
    out = [dihedral(rows[j, :, y : y + crop, x : x + crop], int(k)) for j, (y, x, k) in enumerate(zip(ys, xs, torch.randint(0, 8, (len(idx),), generator=g)))]
    return torch.stack(out)


def train_vae(backbone: Backbone, images: np.ndarray, cfg, progress=None, state_dir: Path | None = None) -> list[float]:
    """Train the VAE on (N, H, W, 3) uint8 images; sets the latent scaling factor from the data.

    `cfg` has vae_steps, vae_batch_size, vae_crop, vae_lr, kl_weight, checkpoint_every and seed
    (config.BackboneConfig). With `state_dir`, the phase checkpoints there and resumes from it.
    """
    vae = backbone.vae.train().requires_grad_(True)
    crop = min(cfg.vae_crop, images.shape[2])
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _one_cycle(opt, cfg.vae_lr, cfg.vae_steps)
    ckpt = PhaseCheckpoint(state_dir, "vae", cfg.checkpoint_every)
    start, losses = ckpt.restore(vae, opt, sched)
    for step in range(start, cfg.vae_steps):
        g = step_generator(cfg.seed, step)
        x = _random_crops(images, batch_indices(len(images), cfg.vae_batch_size, step, cfg.seed), crop, g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.l1_loss(rec, x) + 0.5 * gradient_l1(rec, x) + cfg.kl_weight * post.kl().mean()
        optimiser_step(loss, vae.parameters(), opt, sched)
        losses.append(loss.item())
        ckpt.maybe_save(step + 1, cfg.vae_steps, vae, opt, sched, losses)
        if progress:
            progress(step + 1, cfg.vae_steps, losses[-1])
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(to_model_range(images[i : i + 64])).latent_dist.mean for i in range(0, min(len(images), 512), 64)])
    # As SD did: scale latents to unit variance so the noise schedule sees the intended SNR.
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return losses


@torch.no_grad()
def encode_dataset(backbone: Backbone, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Scaled VAE latent means for all images: (N, 4, h, w) (the images are read a batch at a time)."""
    return torch.cat([backbone.encode_images(to_model_range(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])


def train_text_to_image(backbone: Backbone, images: np.ndarray, prompts: list[str], cfg, progress=None, state_dir: Path | None = None) -> list[float]:
    """Train the UNet as a text-to-image model on cached latents and text embeddings (resumable like train_vae)."""
    latents = encode_dataset(backbone, images)
    unique = sorted(set(prompts))
    table = backbone.encode_prompts(unique + [""])  # (P + 1, 77, D); the frozen encoder runs once
    prompt_idx = torch.tensor([unique.index(p) for p in prompts])
    empty = table[-1:]
    unet = backbone.unet.train().requires_grad_(True)
    loss_fn = DiffusionLoss(backbone.scheduler)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    sched = _one_cycle(opt, cfg.unet_lr, cfg.unet_steps)
    ckpt = PhaseCheckpoint(state_dir, "unet", cfg.checkpoint_every)
    start, losses = ckpt.restore(unet, opt, sched)
    for step in range(start, cfg.unet_steps):
        g = step_generator(cfg.seed, step, stream=1)
        idx = batch_indices(len(latents), cfg.unet_batch_size, step, cfg.seed + 1)
        k = int(torch.randint(0, 8, (1,), generator=g))
        z = dihedral(latents[idx], k)  # latent flips/rotations ~ image flips/rotations for a conv VAE
        emb = drop_prompts(table[prompt_idx[idx]], empty, cfg.prompt_dropout, g)
        loss = loss_fn(lambda noisy, t: unet(noisy, t, emb).sample, z, g)
        optimiser_step(loss, unet.parameters(), opt, sched)
        losses.append(loss.item())
        ckpt.maybe_save(step + 1, cfg.unet_steps, unet, opt, sched, losses)
        if progress:
            progress(step + 1, cfg.unet_steps, losses[-1])
    unet.eval().requires_grad_(False)
    return losses

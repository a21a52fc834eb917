"""Fine-tuning the VAE decoder on the training split, weighted towards rare classes (the round-trip wall).

A latent diffusion model can only draw what its VAE's decoder draws back from a latent. A small, rare
structure that the autoencoder never learnt (the phantom's dead nuclei: a 5 px pink disc with 1-2 px dark
fragments) comes back as an ordinary nucleus, so no ControlNet on that backbone can render the class.
The encoder usually still tells it apart in the latent; the decoder does not use it. As Stability did for
SD's `sd-vae-ft-mse`, only the decoder is fine-tuned, so the latent space (and with it the UNet and any
ControlNet or cached latents) stays valid; here the L1 + gradient loss is weighted per mask class and a
share of the crops is centred on the weighted classes, so the rare class is seen and counted.

Only the split the ControlNet trains on is used (its masks included), never validation or test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from synthmed.models.trained import cast
from synthmed.training.backbone import gradient_l1
from synthmed.training.common import PhaseCheckpoint, dihedral, optimiser_step, to_model_range, warmup_cosine


def focus_pixels(masks: np.ndarray, class_weights: torch.Tensor) -> list[tuple[float, np.ndarray]]:
    """[(weight, (k, 3) array of n, y, x)] for every class weighted above 1 that the masks hold."""
    out = []
    for code, w in enumerate(class_weights.tolist()):
        if w > 1 and code > 0:
            where = np.argwhere(masks == code)
            if len(where):
                out.append((float(w), where))
    return out


def _crop_corner(centre: int, size: int, crop: int, jitter: int, rng) -> int:
    return int(np.clip(centre - crop // 2 + rng.integers(-jitter, jitter + 1), 0, size - crop))


def decoder_batch(images: torch.Tensor, weights: torch.Tensor, focus: list, batch_size: int, crop: int, focus_share: float, rng):
    """A batch of crops (images, per-pixel weights): `focus_share` of them centred near a pixel of a weighted
    class (a class drawn in proportion to its weight, then one of its pixels), the rest anywhere; each in one
    of the 8 dihedral views."""
    _, _, h, w = images.shape
    n_focus = int(round(focus_share * batch_size)) if focus else 0
    probs = np.array([f[0] for f in focus]) / sum(f[0] for f in focus) if focus else None
    xs, ws = [], []
    for b in range(batch_size):
        if b < n_focus:
            where = focus[int(rng.choice(len(focus), p=probs))][1]
            n, y, x = where[rng.integers(len(where))]
            y0, x0 = _crop_corner(y, h, crop, crop // 4, rng), _crop_corner(x, w, crop, crop // 4, rng)
        else:
            n, y0, x0 = int(rng.integers(len(images))), int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        k = int(rng.integers(8))
        xs.append(dihedral(images[n, :, y0 : y0 + crop, x0 : x0 + crop], k))
        ws.append(dihedral(weights[n, :, y0 : y0 + crop, x0 : x0 + crop], k))
    return torch.stack(xs), torch.stack(ws)


def weighted_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Class-weighted L1 (normalised by the weights) + half the L1 between image gradients (against blur)."""
    return ((rec - x).abs() * w).sum() / (w.sum() * x.shape[1]) + 0.5 * gradient_l1(rec, x)


def finetune_decoder(backbone, images: np.ndarray, masks: np.ndarray | None, class_weights: torch.Tensor | None, cfg,
                     progress=None, state_dir: Path | None = None) -> list[float]:
    """Fine-tune backbone.vae's decoder (and post_quant_conv) on (N, H, W, 3) uint8 images in place.

    `cfg`: steps, batch_size, crop, lr, focus_share, checkpoint_every, seed (config.DecoderConfig). The
    encoder is frozen and the decoder sees the latent means, so latents do not change. With `state_dir`
    the phase checkpoints there and resumes from it.
    """
    vae = backbone.vae
    device, dtype = vae.device, vae.dtype
    cast(vae, dtype=torch.float32).eval().requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    x_all = to_model_range(images)
    if masks is not None and class_weights is not None:
        w_all = class_weights.float()[torch.from_numpy(masks.astype(np.int64))][:, None]
        focus = focus_pixels(masks, class_weights)
    else:
        w_all, focus = torch.ones(len(images), 1, *images.shape[1:3]), []
    crop = min(cfg.crop, *images.shape[1:3])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps)
    ckpt = PhaseCheckpoint(state_dir, "decoder", cfg.checkpoint_every)
    parts = DecoderParts(vae)
    start, losses = ckpt.restore(parts, opt, sched)
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        x, w = decoder_batch(x_all, w_all, focus, cfg.batch_size, crop, cfg.focus_share, rng)
        x, w = x.to(device), w.to(device)
        vae.decoder.train()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss = weighted_loss(vae.decode(z).sample, x, w)
        optimiser_step(loss, params, opt, sched)
        losses.append(loss.item())
        ckpt.maybe_save(step + 1, cfg.steps, parts, opt, sched, losses)
        if progress:
            progress(step + 1, cfg.steps, losses[-1])
    cast(vae.eval().requires_grad_(False), dtype=dtype)
    return losses


class DecoderParts(torch.nn.Module):
    """The trained parts of the VAE as one module, for checkpoints."""

    def __init__(self, vae):
        super().__init__()
        self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv

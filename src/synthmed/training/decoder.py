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

from synthmed.models.tasknets import to_unit_range
from synthmed.models.trained import cast
from synthmed.training.backbone import gradient_l1
from synthmed.training.common import PhaseCheckpoint, dihedral, optimiser_step, to_model_range, warmup_cosine


class FocusPixels:
    """The pixels of every class weighted above 1 that the masks hold, without listing them: per class its weight
    and per image a running count, so that pixel j of a class (in `np.argwhere(masks == code)` order) is found by
    reading one mask. Masks may be a split on disk (read 256 at a time here, one per draw later)."""

    def __init__(self, masks, class_weights: torch.Tensor, chunk: int = 256):
        self.masks = masks
        codes = [(code, float(w)) for code, w in enumerate(class_weights.tolist()) if w > 1 and code > 0]
        counts = np.zeros((len(masks), len(codes)), np.int64)
        for start in range(0, len(masks), chunk):
            m = np.asarray(masks[start : start + chunk])
            for j, (code, _) in enumerate(codes):
                counts[start : start + len(m), j] = (m == code).reshape(len(m), -1).sum(1)
        cums = np.cumsum(counts, axis=0)
        self.classes = [(w, code, cums[:, j]) for j, (code, w) in enumerate(codes) if len(masks) and cums[-1, j] > 0]

    def __len__(self) -> int:
        return len(self.classes)

    def weights(self) -> list[float]:
        return [w for w, _, _ in self.classes]

    def count(self, i: int) -> int:
        return int(self.classes[i][2][-1])

    def pixel(self, i: int, j: int) -> tuple[int, int, int]:
        """(n, y, x) of pixel j of class i, in the order np.argwhere lists them."""
        _, code, cum = self.classes[i]
        n = int(np.searchsorted(cum, j, side="right"))
        y, x = np.argwhere(np.asarray(self.masks[n]) == code)[j - (cum[n - 1] if n else 0)]
        return n, int(y), int(x)


def _crop_corner(centre: int, size: int, crop: int, jitter: int, rng) -> int:
    return int(np.clip(centre - crop // 2 + rng.integers(-jitter, jitter + 1), 0, size - crop))


def draw_picks(n_images: int, size: tuple[int, int], focus: FocusPixels | None, batch_size: int, crop: int, focus_share: float,
               rng) -> list[tuple[int, int, int, int]]:
    """(image, top, left, dihedral view) of each crop of a batch: `focus_share` of them centred near a pixel of a
    weighted class (a class drawn in proportion to its weight, then one of its pixels), the rest anywhere."""
    h, w = size
    n_focus = int(round(focus_share * batch_size)) if focus else 0
    probs = np.array(focus.weights()) / sum(focus.weights()) if focus else None
    picks = []
    for b in range(batch_size):
        if b < n_focus:
            i = int(rng.choice(len(focus), p=probs))
            n, y, x = focus.pixel(i, int(rng.integers(focus.count(i))))
            y0, x0 = _crop_corner(y, h, crop, crop // 4, rng), _crop_corner(x, w, crop, crop // 4, rng)
        else:
            n, y0, x0 = int(rng.integers(n_images)), int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        picks.append((n, y0, x0, int(rng.integers(8))))
    return picks


def crops_of(images, masks, class_weights: torch.Tensor | None, picks, crop: int, cond=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The picks' crops (images in the model's range, per-pixel weights, conditioning in [0, 1] or None). `images`
    (N, H, W, C) uint8, `masks` (N, H, W) and `cond` (N, H, W, C') uint8 may be splits on disk: only the rows the
    picks crop from are read."""
    h, w = images.shape[1], images.shape[2]
    rows = sorted({p[0] for p in picks})
    at = {n: r for r, n in enumerate(rows)}
    x_rows = to_model_range(np.asarray(images[rows]))  # (R, C, H, W)
    w_rows = (class_weights.float()[torch.from_numpy(np.asarray(masks[rows]).astype(np.int64))][:, None] if class_weights is not None
              else torch.ones(len(rows), 1, h, w))
    c_rows = None if cond is None else to_unit_range(cond[rows])

    def views(rows_t):
        return torch.stack([dihedral(rows_t[at[n], :, y0 : y0 + crop, x0 : x0 + crop], k) for n, y0, x0, k in picks])

    return views(x_rows), views(w_rows), None if c_rows is None else views(c_rows)


def decoder_batch(images, masks, class_weights: torch.Tensor | None, focus: FocusPixels | None, batch_size: int, crop: int,
                  focus_share: float, rng, cond=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch of crops (draw_picks, then crops_of), each in one of the 8 dihedral views."""
    picks = draw_picks(len(images), images.shape[1:3], focus, batch_size, crop, focus_share, rng)
    return crops_of(images, masks, class_weights, picks, crop, cond)


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
    if masks is None or class_weights is None:
        masks, class_weights = None, None
    focus = FocusPixels(masks, class_weights) if masks is not None else None
    crop = min(cfg.crop, *images.shape[1:3])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps)
    ckpt = PhaseCheckpoint(state_dir, "decoder", cfg.checkpoint_every)
    parts = DecoderParts(vae)
    start, losses = ckpt.restore(parts, opt, sched)
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        x, w, _ = decoder_batch(images, masks, class_weights, focus, cfg.batch_size, crop, cfg.focus_share, rng)
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


def train_refiner(backbone, images, masks, cond, class_weights: torch.Tensor | None, cfg, progress=None, state_dir: Path | None = None,
                  latents=None):
    """A ConditionedRefiner (models/refiner.py) for backbone.vae's decoder, trained on (N, H, W, 3) uint8 images and their
    (N, H, W, C) uint8 conditioning: round trips of crops (latent means plus noise of up to `latent_noise` x the
    latents' std, so that generated latents are in its range) against the crops, with the decoder's class-weighted
    loss. `cfg`: RefinerConfig fields, focus_share and seed. Returns (refiner, losses, record: {"compiled": whether the
    compile held} where asked); resumes from `state_dir`.

    `latents`: the images' scaled latent means in all 8 dihedral views (`latents[idx, view]`, a LatentStore), used
    when every crop is a whole image (square images no larger than the crop): a step then decodes only, instead of
    encoding its batch again (the same means, up to the rounding of another batch composition).

    `cfg.compile`: its training forward runs through torch.compile on channels-last tensors (the same function, other
    rounding); the refiner returned is in the default memory format, as one loaded from disk."""
    from synthmed.models.refiner import new_refiner
    from synthmed.training.common import CompiledForward

    vae = backbone.vae
    device = vae.device
    refiner = new_refiner(cond.shape[-1], cfg.width, cfg.depth, cfg.seed).to(device)
    layout = torch.channels_last if cfg.compile else torch.contiguous_format
    refiner = refiner.to(memory_format=layout)
    forward = CompiledForward(refiner, cfg.compile)
    if masks is None or class_weights is None:
        masks, class_weights = None, None
    focus = FocusPixels(masks, class_weights) if masks is not None else None
    crop = min(cfg.crop, *images.shape[1:3])
    if latents is not None and not whole_image_crops(images.shape[1:3], cfg.crop):
        raise ValueError(f"train_refiner expects latents only when crops are whole square images, but got images {tuple(images.shape[1:3])} and crop {cfg.crop}")
    opt = torch.optim.AdamW(refiner.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps)
    ckpt = PhaseCheckpoint(state_dir, "refiner", cfg.checkpoint_every)
    start, losses = ckpt.restore(refiner, opt, sched)
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step, 1])
        picks = draw_picks(len(images), images.shape[1:3], focus, cfg.batch_size, crop, cfg.focus_share, rng)
        x, w, c = (t.to(device) for t in crops_of(images, masks, class_weights, picks, crop, cond=cond))
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        with torch.no_grad():
            if latents is None:
                z = vae.encode(x.to(vae.dtype)).latent_dist.mean
            else:
                z = (latents[[p[0] for p in picks], [p[3] for p in picks]] / vae.config.scaling_factor).to(device, vae.dtype)
            sigma = torch.rand(len(z), 1, 1, 1, generator=g).to(device) * cfg.latent_noise * z.float().std()
            rec = vae.decode(z + (sigma * torch.randn(z.shape, generator=g).to(device)).to(z.dtype)).sample.float().clamp(-1, 1)
        loss = weighted_loss(forward(rec.contiguous(memory_format=layout), c.contiguous(memory_format=layout)), x, w)
        optimiser_step(loss, list(refiner.parameters()), opt, sched)
        losses.append(loss.item())
        ckpt.maybe_save(step + 1, cfg.steps, refiner, opt, sched, losses)
        if progress:
            progress(step + 1, cfg.steps, losses[-1])
    record = {"compiled": forward.compiled} if cfg.compile else {}
    return refiner.to(memory_format=torch.contiguous_format).eval().requires_grad_(False), losses, record


def whole_image_crops(size: tuple[int, int], crop: int) -> bool:
    """Whether every refiner crop is a whole image (square images no larger than the crop): then its round trips
    can start from cached latents of the 8 dihedral views."""
    return size[0] == size[1] <= crop


class DecoderParts(torch.nn.Module):
    """The trained parts of the VAE as one module, for checkpoints."""

    def __init__(self, vae):
        super().__init__()
        self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv

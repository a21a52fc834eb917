"""Pieces every training loop shares: deterministic batches, augmentation, the diffusion loss."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synthmed.core.progress import note


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `step`, a pure function of (seed, step): resuming repeats them."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch_size,), generator=g)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A fresh generator per (seed, step, stream), so noise does not depend on past steps."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 (an array, or a DiskArray: read whole) -> (N, C, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(images_uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)



def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/90-degree rotations of (..., H, W); applied identically to image and mask."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


@dataclass
class DiffusionLoss:
    """Noise- (or v-) prediction loss of a (ControlNet-)UNet at uniformly drawn timesteps.

    The target follows the backbone's scheduler config (`prediction_type`: SD 1.5 and 2.x base
    predict epsilon, SD 2.x 768-v predicts v). Options: `min_snr_gamma` weights each sample by
    min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v) or by min(SNR, gamma) (sample), Hang et al. 2023; `pixel_weights` (B, h, w)
    multiply the squared error on the latent grid (rare-class weighting, as MAISI does).
    """

    scheduler: object  # diffusers noise scheduler (DDPMScheduler)
    min_snr_gamma: float | None = None

    def target(self, latents, noise, timesteps):
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"DiffusionLoss expects epsilon, v_prediction or sample, but got {kind!r}")

    def draw(self, shape, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (shape) and timesteps (shape[0],) from one generator, in a fixed order."""
        noise = torch.randn(shape, generator=generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (shape[0],), generator=generator)
        return noise, t

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample min-SNR weights (B,)."""
        alpha_bar = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=self.min_snr_gamma)
        kind = self.scheduler.config.prediction_type
        if kind == "sample":
            return clipped
        return clipped / (snr + 1) if kind == "v_prediction" else clipped / snr

    def __call__(self, predict, latents: torch.Tensor, generator: torch.Generator | None = None, noise=None, timesteps=None, pixel_weights=None) -> torch.Tensor:
        """`predict(noisy, timesteps)` returns the model output; latents are (B, C, h, w).

        Pass a generator to draw noise and timesteps here, or `noise`/`timesteps` drawn by the
        caller (e.g. once for a global batch that several processes share).
        """
        if noise is None:
            noise, timesteps = self.draw(latents.shape, generator)
        noise, t = noise.to(latents.device), timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        err = (predict(noisy, t).float() - self.target(latents, noise, t).float()) ** 2  # (B, C, h, w)
        if pixel_weights is not None:
            err = err * pixel_weights[:, None].to(err)
        per_sample = err.mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            per_sample = per_sample * self.snr_weights(t)
        return per_sample.mean()


def latent_weights(masks: torch.Tensor, class_weights: torch.Tensor, factor: int) -> torch.Tensor:
    """Per-latent-pixel loss weights (B, h, w): class weight of each mask pixel, averaged over
    the factor x factor pixels a latent covers (so a small rare object still counts)."""
    w = class_weights.to(masks.device)[masks.long()]  # (B, H, W)
    return F.avg_pool2d(w[:, None].float(), factor)[:, 0]


def drop_prompts(embeddings: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace a proportion p of prompt embeddings by the empty prompt (for classifier-free guidance)."""
    if p <= 0:
        return embeddings
    keep = torch.rand(embeddings.shape[0], generator=generator) >= p
    return torch.where(keep[:, None, None].to(embeddings.device), embeddings, empty.to(embeddings.dtype))


def warmup_cosine(optimizer, total: int, warmup_fraction: float = 0.05, floor: float = 0.1):
    """LambdaLR: linear warm-up, then cosine decay to `floor` x the base rate; any total >= 1."""
    warmup = max(1, int(total * warmup_fraction))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def optimiser_step(loss: torch.Tensor, params, optimizer, scheduler, clip: float | None = 1.0) -> None:
    """Backward pass, optional gradient-norm clipping, optimiser and schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _apply_gradients(params, optimizer, scheduler, clip)


def _apply_gradients(params, optimizer, scheduler, clip: float | None) -> None:
    """Optional gradient-norm clipping, then the optimiser and schedule step."""
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    scheduler.step()


TRAIN_PIXELS = 16 * 256 * 256  # pixels per forward/backward pass of a task network's training step


class CompiledForward:
    """A model's forward for training steps, through torch.compile where asked. Inductor's kernels give the same
    function in fp32 with other rounding (about 1.4x the steps per second of a small U-Net on one CPU thread);
    the first compile is cached on disk for later processes. If compiling fails (no C++ compiler, an op it
    cannot trace), the forward falls back to eager with one note and `compiled` says so (the record keeps it)."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.model, self.compiled = model, enabled
        self.fast = torch.compile(model) if enabled else None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.model(*inputs)
        try:
            return self.fast(*inputs)
        except Exception as exc:  # noqa: BLE001  (inductor raises many kinds; eager is always correct)
            note(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); training eagerly")
            self.compiled = False
            return self.model(*inputs)


def micro_batches(batch: int, pixels: int) -> int:
    """Into how many equal parts a training batch of `batch` images of `pixels` pixels each is split so that a
    part holds at most TRAIN_PIXELS pixels (1 up to 16 images of 256 x 256; 4 parts of 4 at 512 px)."""
    for k in range(1, batch + 1):
        if batch % k == 0 and (batch // k) * pixels <= TRAIN_PIXELS:
            return k
    return batch


def accumulated_step(loss_of, x: torch.Tensor, y: torch.Tensor, params, optimizer, scheduler, clip: float | None = 1.0) -> float:
    """One optimiser step on a batch, its forward/backward passes in `micro_batches` equal parts with the
    gradients of their mean loss accumulated: activation memory bounded at any image size. For networks without
    batch statistics (MONAI's U-Net: instance norm) and a loss that is a mean over images (Dice) or over pixels
    (unweighted cross-entropy) this is the full batch's gradient; a class-weighted cross-entropy is normalised
    per part. With one part it is `optimiser_step(loss_of(x, y))` exactly. Returns the loss."""
    k = micro_batches(len(x), int(x.shape[-1] * x.shape[-2]))
    if k == 1:
        loss = loss_of(x, y)
        optimiser_step(loss, params, optimizer, scheduler, clip)
        return loss.item()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        loss = loss_of(xs, ys) / k
        loss.backward()
        total += loss.item()
    _apply_gradients(params, optimizer, scheduler, clip)
    return total


class PhaseCheckpoint:
    """Atomic checkpoints of one training phase (model, optimiser, schedule, losses), loaded weights-only.

    With folder=None it does nothing, so loops can always call it.
    """

    def __init__(self, folder: Path | None, name: str, every: int):
        self.path = None if folder is None else Path(folder) / f"{name}.pt"
        self.every = every

    def restore(self, model, optimizer, scheduler) -> tuple[int, list[float]]:
        """Load the saved state if there is one; returns (steps done, losses so far)."""
        if self.path is None or not self.path.is_file():
            return 0, []
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"]), list(state["losses"])

    def maybe_save(self, done: int, total: int, model, optimizer, scheduler, losses: list[float]) -> None:
        """Save every `every` steps and at the end of the phase (temporary name, then rename)."""
        if self.path is None or (done % self.every and done != total):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": done, "losses": losses}
        torch.save(state, tmp)
        os.replace(tmp, self.path)

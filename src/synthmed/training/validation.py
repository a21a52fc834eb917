"""Validation during training: a loss on fixed validation samples with fixed noise, and a grid of
images rendered from fixed validation masks (rows: conditioning, real, generated)."""

from __future__ import annotations

import numpy as np
import torch

from synthmed.training.batches import TrainingData
from synthmed.training.common import DiffusionLoss, step_generator


@torch.no_grad()
def validation_loss(model, backbone, data: TrainingData, seed: int = 0) -> float:
    """Mean diffusion loss over every validation sample, with the same noise each call.

    `data` is built with flips off and no crop/rescale, so every call sees the same (view 0) inputs.
    """
    device = next(model.parameters()).device
    idx = torch.arange(len(data))
    latents, cond, _ = data.batch(backbone, idx, data.draw(len(data), step_generator(seed, 0, stream=99)))
    emb = data.embeddings(backbone, data.prompt_index).to(device)
    cond = None if cond is None else cond.to(device)
    loss_fn = DiffusionLoss(backbone.scheduler)
    noise, t = loss_fn.draw(latents.shape, step_generator(seed, 0, stream=98))
    was_training = model.training
    model.eval()
    loss = float(loss_fn(lambda noisy, ts: model(noisy, ts, emb, cond), latents.to(device), noise=noise, timesteps=t))
    model.train(was_training)
    return loss


@torch.no_grad()
def validation_grid(model, backbone, images: np.ndarray, cond: np.ndarray | None, prompts: list[str], steps: int, seed: int = 0) -> np.ndarray:
    """(3 H, N W, 3) uint8: conditioning, real and generated image of each validation sample."""
    from synthmed.models.sampling import controlnet_pipeline, sample_images, SamplingSettings, text_pipeline

    was_training = model.training
    model.eval()
    seeds = [seed * 1_000_000 + i for i in range(len(prompts))]
    settings = SamplingSettings(steps=steps)
    if model.controlnet is not None:
        generated = sample_images(controlnet_pipeline(backbone, model.controlnet), cond, prompts, seeds, settings)
    else:
        generated = sample_images(text_pipeline(backbone), None, prompts, seeds, settings, size=images.shape[1:3])
    model.train(was_training)
    top = np.zeros_like(images) if cond is None else np.stack([_rgb(c) for c in cond])
    return np.concatenate([np.concatenate(list(col), 0) for col in zip(top, images, generated)], 1)


def _rgb(c: np.ndarray) -> np.ndarray:
    """A conditioning image (H, W, C) as RGB for display: grey repeated, extra channels cut."""
    c = c if c.ndim == 3 else c[..., None]
    return np.repeat(c[..., :1], 3, -1) if c.shape[-1] < 3 else c[..., :3]

"""Sampling images from conditioning masks with a diffusers ControlNet pipeline.

Each sample has its own seed (its own torch.Generator), so sample i is the same image
whatever the batch size it was drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    UniPCMultistepScheduler,
)

from synthmed.models.backbone import Backbone

SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "unipc": lambda cfg: UniPCMultistepScheduler.from_config(cfg),
    "dpm": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2),
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
}


@dataclass(frozen=True)
class SamplingSettings:
    """How images are drawn; recorded in every sample's provenance."""

    scheduler: str = "unipc"
    steps: int = 25
    guidance_scale: float = 3.0
    conditioning_scale: float = 1.0

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"SamplingSettings expects scheduler in {sorted(SCHEDULERS)}, but got {self.scheduler!r}")


def controlnet_pipeline(backbone: Backbone, controlnet, scheduler: str = "unipc") -> StableDiffusionControlNetPipeline:
    """A plain diffusers ControlNet pipeline over the backbone's parts."""
    pipe = StableDiffusionControlNetPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        controlnet=controlnet.eval(),
        scheduler=SCHEDULERS[scheduler](backbone.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_pipeline(backbone: Backbone, scheduler: str = "unipc"):
    """A plain diffusers text-to-image pipeline over the backbone's parts (text-only models)."""
    pipe = backbone.pipeline()
    pipe.scheduler = SCHEDULERS[scheduler](backbone.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(pipe, cond_images: np.ndarray | None, prompts: list[str], seeds: list[int], settings: SamplingSettings,
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for conditioning images (B, H, W, C) uint8, one seed per sample.

    With `cond_images` None, `pipe` is a text-to-image pipeline and `size` gives (H, W).
    """
    n_cond = len(prompts) if cond_images is None else len(cond_images)
    if not (n_cond == len(prompts) == len(seeds)):
        raise ValueError(f"sample_images expects equal lengths, but got {n_cond}, {len(prompts)}, {len(seeds)}")
    kwargs = {}
    if cond_images is not None:
        cond_images = cond_images if cond_images.ndim == 4 else cond_images[..., None]
        size = cond_images.shape[1:3]
        kwargs = dict(image=torch.from_numpy(cond_images).permute(0, 3, 1, 2).float().div(255.0),  # (B, C, H, W) in [0, 1]
                      controlnet_conditioning_scale=settings.conditioning_scale)
    out = pipe(
        prompt=list(prompts),
        height=size[0],
        width=size[1],
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
        output_type="np",
        **kwargs,
    ).images  # (B, H, W, 3) float in [0, 1]
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)

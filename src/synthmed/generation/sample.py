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


@torch.no_grad()
def sample_images(pipe: StableDiffusionControlNetPipeline, cond_images: np.ndarray, prompts: list[str], seeds: list[int], settings: SamplingSettings) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for conditioning images (B, H, W, 3) uint8, one seed per sample."""
    if not (len(cond_images) == len(prompts) == len(seeds)):
        raise ValueError(f"sample_images expects equal lengths, but got {len(cond_images)}, {len(prompts)}, {len(seeds)}")
    h, w = cond_images.shape[1:3]
    cond = torch.from_numpy(cond_images).permute(0, 3, 1, 2).float().div(255.0)  # (B, 3, H, W) in [0, 1]
    out = pipe(
        prompt=list(prompts),
        image=cond,
        height=h,
        width=w,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        controlnet_conditioning_scale=settings.conditioning_scale,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
        output_type="np",
    ).images  # (B, H, W, 3) float in [0, 1]
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)

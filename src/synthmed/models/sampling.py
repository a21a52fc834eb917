"""The plain diffusers pipelines over a backbone's parts, the schedulers by name and the sampling settings.

The reference sampler: training's validation grid draws with it, and the tests and `benchmarks/generate.py`
compare synthmed's own `generation.sample.Sampler` against it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    guess_mode: bool = False
    control_start: float = 0.0
    control_end: float = 1.0
    negative_prompt: str = ""

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"SamplingSettings expects scheduler in {sorted(SCHEDULERS)}, but got {self.scheduler!r}")
        if not 0 <= self.control_start < self.control_end <= 1:
            raise ValueError(f"SamplingSettings expects 0 <= control_start < control_end <= 1, but got {self.control_start}, {self.control_end}")
        if self.steps < 1 or self.guidance_scale < 0 or self.conditioning_scale < 0:
            raise ValueError(f"SamplingSettings expects steps >= 1 and non-negative scales, but got {self.steps}, {self.guidance_scale}, {self.conditioning_scale}")

    def record(self) -> dict:
        return asdict(self)


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
    """The plain diffusers pipeline call: images (B, H, W, 3) uint8 for conditioning (B, H, W, C) uint8.

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
                      controlnet_conditioning_scale=settings.conditioning_scale, guess_mode=settings.guess_mode,
                      control_guidance_start=settings.control_start, control_guidance_end=settings.control_end)
    out = pipe(
        prompt=list(prompts),
        negative_prompt=[settings.negative_prompt] * len(prompts) if settings.guidance_scale > 1 else None,
        height=size[0],
        width=size[1],
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
        output_type="np",
        **kwargs,
    ).images  # (B, H, W, 3) float in [0, 1]
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)

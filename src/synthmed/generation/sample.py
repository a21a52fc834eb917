"""Sampling images from conditioning images (and prompts) with a frozen backbone and a ControlNet.

`Sampler` is synthmed's own denoising loop over diffusers' models and schedulers. It follows
`StableDiffusionControlNetPipeline.__call__` step for step (classifier-free guidance with the
unconditional and conditional passes in one batch, guess mode, control guidance start/end,
negative prompts) and adds what generation at scale needs:

- one seed per sample, and batch-size invariance: every batch is padded to a multiple of
  `ROW_BLOCK` samples, because on CPU a convolution over a batch of one, and a 2-D linear layer
  (the time embedding) over a number of rows that is not a multiple of 4 (below 12), compute some
  rows with other kernels (last-bit differences) than larger batches do. Padded, the result of a
  row does not depend on its neighbours, so sample i is bit-identical whatever the batch size or
  number of processes (tested on CPU; on GPU, cuDNN/cuBLAS kernel choices make it equal up to
  floating-point noise only);
- prompt embeddings computed once per distinct prompt (each alone, so also batch-invariant);
- the ControlNet skipped on steps where its scale is 0 (outside control guidance start/end);
- the prompts' cross-attention keys and values computed once per call, not at every step;
- channels-last memory layout for the convolutions (oneDNN on CPU, tensor cores on CUDA).

`models.sampling` keeps the plain diffusers pipeline: the reference the tests and
`benchmarks/generate.py` compare against.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from synthmed.models.backbone import Backbone
from synthmed.models.refiner import refine
from synthmed.models.sampling import SCHEDULERS, SamplingSettings

ROW_BLOCK = 4  # see the module docstring: other batch sizes take other CPU kernels for some rows


class Sampler:
    """Draws images (B, H, W, 3) uint8 from conditioning (B, H, W, C) uint8, prompts and per-sample seeds."""

    def __init__(self, backbone: Backbone, controlnet=None, settings: SamplingSettings = SamplingSettings(),
                 device: str = "cpu", dtype: torch.dtype = torch.float32, channels_last: bool = True):
        self.bb, self.settings, self.device, self.dtype = backbone, settings, torch.device(device), dtype
        self.controlnet = None if controlnet is None else _place(controlnet, self.device, dtype)
        for m in (backbone.unet, backbone.vae, backbone.text_encoder):
            _place(m, self.device, dtype)
        if backbone.refiner is not None:
            backbone.refiner.to(self.device)  # float32: models/refiner.refine
        if channels_last:
            for m in (backbone.unet, backbone.vae, self.controlnet):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        self._embeds: dict[str, torch.Tensor] = {}

    @property
    def cfg(self) -> bool:
        return self.settings.guidance_scale > 1.0

    def _embed(self, prompt: str) -> torch.Tensor:
        """(1, L, D) text embedding of one prompt, computed once."""
        if prompt not in self._embeds:
            tok = self.bb.tokenizer([prompt], padding="max_length", max_length=self.bb.tokenizer.model_max_length, truncation=True, return_tensors="pt")
            self._embeds[prompt] = self.bb.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)
        return self._embeds[prompt]

    def _pad(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Repeat the first row so that the batch has at least `rows` rows (dropped afterwards)."""
        return x if len(x) >= rows else torch.cat([x, x[:1].expand(rows - len(x), *x.shape[1:])])

    @torch.inference_mode()
    def __call__(self, cond: np.ndarray | None, prompts: list[str], seeds: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
        n = len(prompts)
        if cond is not None and (self.controlnet is None or len(cond) != n) or len(seeds) != n:
            raise ValueError(f"Sampler expects one conditioning image (with a ControlNet), prompt and seed per sample, but got {None if cond is None else len(cond)}, {n}, {len(seeds)}")
        if cond is None and self.controlnet is not None:
            raise ValueError("Sampler with a ControlNet expects conditioning images, but got None")
        s = self.settings
        if cond is not None:
            cond = cond if cond.ndim == 4 else cond[..., None]
            size = cond.shape[1:3]
        f = self.bb.vae_scale_factor
        # Pad the batch itself (not each call) so every tensor keeps one row per (padded) sample.
        b = -(-n // ROW_BLOCK) * ROW_BLOCK  # every network call gets a multiple of ROW_BLOCK rows
        seeds = list(seeds) + [seeds[0]] * (b - n)
        text = torch.cat([self._embed(p) for p in list(prompts) + [prompts[0]] * (b - n)])  # (B, L, D)
        embeds = torch.cat([self._embed(s.negative_prompt).expand_as(text), text]) if self.cfg else text
        noise = [torch.randn((1, self.bb.unet.config.in_channels, size[0] // f, size[1] // f), generator=torch.Generator().manual_seed(int(x))) for x in seeds]
        scheduler = SCHEDULERS[s.scheduler](self.bb.scheduler.config)
        scheduler.set_timesteps(s.steps, device=self.device)
        latents = torch.cat(noise).to(self.device, self.dtype) * scheduler.init_noise_sigma  # (B, 4, h, w)
        image = None
        if cond is not None:
            image = torch.from_numpy(np.ascontiguousarray(cond)).permute(0, 3, 1, 2).to(self.device, self.dtype).div(255.0)  # (n, C, H, W)
            image = self._pad(image, b)
            if self.cfg and not s.guess_mode:
                image = torch.cat([image, image])
        with _conditioning_embedded_once(self.controlnet, image, self.cfg and not s.guess_mode), _text_keys_once(self.bb.unet, self.controlnet):
            latents = self._denoise(latents, image, embeds, scheduler)
        out = self.bb.vae.decode(latents / self.bb.vae.config.scaling_factor, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
        out = refine(self.bb.refiner, out[:n], None if image is None else image[:n])  # what the latent cannot carry, from the conditioning
        out = (out.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)

    def _denoise(self, latents, image, embeds, scheduler):
        s, timesteps = self.settings, scheduler.timesteps
        for i, t in enumerate(timesteps):
            x = torch.cat([latents, latents]) if self.cfg else latents
            x = scheduler.scale_model_input(x, t)
            keep = 1.0 - float(i / len(timesteps) < s.control_start or (i + 1) / len(timesteps) > s.control_end)
            residuals = {}
            if image is not None and keep * s.conditioning_scale > 0:
                guess = s.guess_mode and self.cfg
                down, mid = self.controlnet(
                    scheduler.scale_model_input(latents, t) if guess else x, t,
                    encoder_hidden_states=embeds.chunk(2)[1] if guess else embeds,
                    controlnet_cond=image, conditioning_scale=s.conditioning_scale * keep, guess_mode=s.guess_mode, return_dict=False)
                if guess:  # the unconditional half gets no control, as in the diffusers pipeline
                    down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                    mid = torch.cat([torch.zeros_like(mid), mid])
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            eps = self.bb.unet(x, t, encoder_hidden_states=embeds, return_dict=False, **residuals)[0]
            if self.cfg:
                uncond, cond_eps = eps.chunk(2)
                eps = uncond + s.guidance_scale * (cond_eps - uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        return latents


def to_greyscale(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grey images (B, H, W) uint8 and colour residuals (B,) from decoded RGB images (B, H, W, 3) uint8.

    SD's VAE has 3 input and output channels. A greyscale data set is fed to it as R = G = B, so the
    grey axis is (1, 1, 1): the channel mean is the projection onto it (luma weights would favour
    green). What the projection discards is measured, not hidden: the residual is the mean absolute
    deviation of the channels from their mean, in grey levels (0-255); about 0 for a model that
    learned grey images, tens of levels for colour (e.g. an RGB-pretrained prior, or colour noise).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"to_greyscale expects RGB images (B, H, W, 3), but got {images.shape}")
    x = images.astype(np.float32)
    mean = x.mean(axis=-1)  # (B, H, W)
    residual = np.abs(x - mean[..., None]).mean(axis=(1, 2, 3))  # (B,)
    return np.clip(np.round(mean), 0, 255).astype(np.uint8), residual


def _place(model, device, dtype):
    """Eval mode on the device; cast only when the dtype changes (diffusers warns on every cast)."""
    model.eval().to(device)
    return model if next(model.parameters()).dtype == dtype else model.to(dtype)


class _Fixed(torch.nn.Module):
    """Stands in for the ControlNet's conditioning embedding: returns one precomputed tensor."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x):
        if x.shape[0] != self.value.shape[0]:
            raise ValueError(f"conditioning embedding expects {self.value.shape[0]} rows, but got {x.shape[0]}")
        return self.value


class _Once(torch.nn.Module):
    """Wraps a cross-attention key/value projection: the text is the same tensor at every step."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.last_in, self.last_out = inner, None, None

    def forward(self, x):
        if x is not self.last_in:
            self.last_in, self.last_out = x, self.inner(x)
        return self.last_out


@contextlib.contextmanager
def _text_keys_once(*models):
    """Project the prompt embeddings to keys and values once per sampling call, not once per step.

    (The diffusers pipeline recomputes them at every step; at low resolutions the 77 text tokens
    outnumber the image tokens, so this is a large share of the attention cost.)
    """
    swapped = []
    for model in models:
        for module in [] if model is None else model.modules():
            if getattr(module, "is_cross_attention", False) and hasattr(module, "to_k"):
                swapped.append((module, module.to_k, module.to_v))
                module.to_k, module.to_v = _Once(module.to_k), _Once(module.to_v)
    try:
        yield
    finally:
        for module, k, v in swapped:
            module.to_k, module.to_v = k, v


@contextlib.contextmanager
def _conditioning_embedded_once(controlnet, image, doubled: bool):
    """The conditioning image is the same at every step and in both guidance halves: embed it once.

    (The diffusers pipeline re-embeds it, at full resolution, for every row of every step.)
    """
    if controlnet is None or image is None:
        yield
        return
    inner = controlnet.controlnet_cond_embedding
    half = image[: len(image) // 2] if doubled else image
    value = inner(half)
    controlnet.controlnet_cond_embedding = _Fixed(torch.cat([value, value]) if doubled else value)
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = inner

"""Stable Diffusion backbones: build a preset from scratch, load a diffusers folder or hub id, save.

A backbone folder is exactly what `StableDiffusionPipeline.save_pretrained` writes, so a real
SD 1.5 / 2.x folder and our tiny preset go through the same loading code.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from synthmed.io import SynthmedError, read_json, write_json
from synthmed.models.registry import PRESETS, BackbonePreset, get_preset
from synthmed.models.tokenizer import build_tokenizer, write_legacy_tokenizer_files

RECIPE = "synthmed_backbone.json"
SHIPPED = {"tiny": "tiny-histology-64"}


@dataclass
class Backbone:
    """The frozen parts of Stable Diffusion that a ControlNet is trained against."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    source: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder}

    def freeze(self) -> "Backbone":
        """Put every network in eval mode with gradients off."""
        for m in self.modules().values():
            m.requires_grad_(False).eval()
        return self

    def to(self, device) -> "Backbone":
        for m in self.modules().values():
            m.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, 77, D) as the UNet's cross-attention expects them."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent means (B, 4, h, w) of images in [-1, 1] (B, 3, H, W)."""
        dist = self.vae.encode(images.to(self.vae.device)).latent_dist
        return dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) from scaled latents."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def pipeline(self) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save(self, folder: Path, recipe: dict | None = None) -> None:
        """Write a diffusers pipeline folder (safetensors) plus the recipe that made it."""
        folder = Path(folder)
        self.pipeline().save_pretrained(folder, safe_serialization=True)
        write_legacy_tokenizer_files(self.tokenizer, folder / "tokenizer")
        if recipe is not None:
            write_json(folder / RECIPE, recipe)


def build_backbone(preset: str | BackbonePreset, seed: int = 0, tokenizer_dir: Path | None = None) -> Backbone:
    """A backbone with the preset's architecture and seeded random weights."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tokenizer_dir)
    te_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **p.text_encoder,
    )
    return Backbone(
        vae=AutoencoderKL(**p.vae),
        unet=UNet2DConditionModel(**p.unet),
        text_encoder=CLIPTextModel(te_cfg),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(**p.scheduler),
        source=f"preset:{p.name}:random(seed={seed})",
    )


def shipped_backbone_dir(name: str) -> Path | None:
    """Folder of a pretrained backbone that ships inside the package, if any."""
    if name not in SHIPPED:
        return None
    folder = Path(str(resources.files("synthmed") / "assets" / "backbones" / SHIPPED[name]))
    return folder if (folder / "model_index.json").is_file() else None


def load_backbone(source: str | Path) -> Backbone:
    """Load a backbone from a preset name with shipped weights, a diffusers folder, or a hub id."""
    src = str(source)
    if src in PRESETS:
        folder = shipped_backbone_dir(src)
        if folder is None:
            raise SynthmedError(
                f"preset {src!r} has no pretrained weights shipped with synthmed; "
                f"give a diffusers folder or run `synthmed train backbone --preset {src}`"
            )
        return _from_folder(folder, f"preset:{src}")
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise SynthmedError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return _from_folder(path, str(path.resolve()))
    if src.count("/") == 1 and not src.startswith((".", "/")):
        return _from_hub(src)
    raise SynthmedError(f"{src}: unknown backbone (not a preset {sorted(PRESETS)}, a folder, or a hub id)")


def _from_folder(folder: Path, label: str, **kwargs) -> Backbone:
    try:
        return Backbone(
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True, **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kwargs),
            scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kwargs),
            source=label,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SynthmedError(f"{folder}: cannot load backbone ({first})") from None


def _from_hub(repo_id: str) -> Backbone:
    """A hub id, resolved from the local Hugging Face cache only (no network at run time)."""
    return _from_folder(repo_id, f"hub:{repo_id}", local_files_only=True)


def read_recipe(folder: Path) -> dict | None:
    """The command and seed that produced a backbone folder, if recorded."""
    f = Path(folder) / RECIPE
    return read_json(f) if f.is_file() else None

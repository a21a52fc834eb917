"""ControlNet built from a backbone UNet (diffusers `from_unet`), sized to the backbone's VAE."""

from __future__ import annotations

import math
from pathlib import Path

from diffusers import ControlNetModel, UNet2DConditionModel

from synthmed.io import SynthmedError

# SD's conditioning-embedding widths; a VAE with fewer downsamplings uses fewer stages.
_SD_EMBEDDING = (16, 32, 96, 256)


def embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of the conditioning embedding so it downsamples pixels to the latent grid."""
    stages = int(math.log2(vae_scale_factor)) + 1
    if 2 ** (stages - 1) != vae_scale_factor or stages > len(_SD_EMBEDDING):
        raise ValueError(f"embedding_channels expects a VAE factor in (1, 2, 4, 8), but got {vae_scale_factor}")
    return _SD_EMBEDDING[:stages]


def build_controlnet(unet: UNet2DConditionModel, vae_scale_factor: int, conditioning_channels: int = 3) -> ControlNetModel:
    """A ControlNet whose encoder is a copy of the UNet's (zero-initialised output convolutions)."""
    return ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=embedding_channels(vae_scale_factor),
        conditioning_channels=conditioning_channels,
    )


def load_controlnet(folder: Path) -> ControlNetModel:
    """Load a saved ControlNet folder, with a one-line error if it is not one."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SynthmedError(f"{folder}: not a ControlNet folder (no config.json)")
    try:
        return ControlNetModel.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise SynthmedError(f"{folder}: cannot load ControlNet ({str(exc).splitlines()[0]})") from None

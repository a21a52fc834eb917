"""Named backbone presets: the Stable Diffusion architecture at different sizes.

`tiny` is SD's architecture shrunk to train on a CPU (64 px images, VAE factor 4 -> 16x16x4
latents); `sd15`, `sd21` (768 px, v-prediction) and `sd21-base` (512 px, epsilon) are the real
architectures, used with random weights in tests and with real weights when a user points at a
checkpoint (`hub_id` is where those weights live on the Hugging Face hub).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sd_scheduler(prediction_type: str = "epsilon") -> dict:
    """The DDPM training schedule of SD 1.x/2.x (scaled-linear betas, 1000 steps)."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


@dataclass(frozen=True)
class BackbonePreset:
    """Everything needed to build an SD-architecture backbone from scratch."""

    name: str
    resolution: int
    vae: dict
    unet: dict
    text_encoder: dict
    scheduler: dict = field(default_factory=sd_scheduler)
    hub_id: str | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def at_sample_size(self, sample_size: int) -> "BackbonePreset":
        """The same architecture for latents of `sample_size` (images of sample_size * VAE factor)."""
        if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 1:
            raise ValueError(f"at_sample_size expects a positive int latent size, but got {sample_size!r}")
        pixels = sample_size * self.vae_scale_factor
        unet, vae = self.unet | dict(sample_size=sample_size), self.vae | dict(sample_size=pixels)
        return replace(self, resolution=pixels, unet=unet, vae=vae)


_TINY = BackbonePreset(
    name="tiny",
    resolution=64,
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    ),
    unet=dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        # No attention at the 16x16 level (as SDXL at its top level): on a CPU that halves the
        # step time. Note diffusers' `attention_head_dim` is the number of heads per level.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=(1, 2, 4),
        norm_num_groups=16,
    ),
    text_encoder=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
    ),
)

_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
_SD_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)

_SD2_UNET = _SD_UNET | dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
# OpenCLIP ViT-H/14 without its last layer: SD 2.x conditions on the penultimate layer.
_SD2_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
)

PRESETS: dict[str, BackbonePreset] = {
    "tiny": _TINY,
    "sd15": BackbonePreset(
        name="sd15",
        resolution=512,
        vae=_SD_VAE,
        unet=_SD_UNET,
        text_encoder=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77
        ),
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    ),
    "sd21": BackbonePreset(
        name="sd21",
        resolution=768,
        vae=_SD_VAE | dict(sample_size=768),
        unet=_SD2_UNET | dict(sample_size=96),
        text_encoder=_SD2_TEXT,
        scheduler=sd_scheduler("v_prediction"),
        hub_id="stabilityai/stable-diffusion-2-1",
    ),
    "sd21-base": BackbonePreset(
        name="sd21-base",
        resolution=512,
        vae=_SD_VAE,
        unet=_SD2_UNET,
        text_encoder=_SD2_TEXT,
        hub_id="stabilityai/stable-diffusion-2-1-base",
    ),
}


def get_preset(name: str) -> BackbonePreset:
    """Look up a preset by name, with the known names in the error."""
    if name not in PRESETS:
        raise ValueError(f"get_preset expects one of {sorted(PRESETS)}, but got {name!r}")
    return PRESETS[name]

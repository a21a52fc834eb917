"""ControlNet built from a backbone UNet (diffusers `from_unet`), sized to the backbone's VAE.

Depth ablation: a ControlNet feeds one residual per UNet encoder stage plus one to the
middle block. `deep` keeps them all; `shallow:K` keeps the residuals of the first K down
blocks (conv_in's included); `mid` keeps only the middle block's. Dropped residuals have
their zero convolutions zeroed and frozen, so the saved model is a plain diffusers
ControlNet that gives exactly the ablated behaviour in any diffusers pipeline.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from synthmed.core.io import SynthmedError
from synthmed.models.backbone import require_weights

# SD's conditioning-embedding widths; a VAE with fewer downsamplings uses fewer stages.
_SD_EMBEDDING = (16, 32, 96, 256)
_DEPTH = re.compile(r"^(deep|mid|shallow)(?::(\d+))?$")


def embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of the conditioning embedding so it downsamples pixels to the latent grid."""
    stages = int(math.log2(vae_scale_factor)) + 1
    if 2 ** (stages - 1) != vae_scale_factor or stages > len(_SD_EMBEDDING):
        raise ValueError(f"embedding_channels expects a VAE factor in (1, 2, 4, 8), but got {vae_scale_factor}")
    return _SD_EMBEDDING[:stages]


def parse_depth(depth: str, n_down_blocks: int) -> tuple[int, bool]:
    """(down blocks whose residuals are kept, mid residual kept) for deep | shallow[:K] | mid."""
    m = _DEPTH.match(depth or "")
    if not m:
        raise ValueError(f"depth expects deep, mid or shallow:K, but got {depth!r}")
    kind, k = m.group(1), m.group(2)
    if kind == "deep":
        return n_down_blocks, True
    if kind == "mid":
        return 0, True
    k = int(k) if k is not None else max(1, n_down_blocks // 2)
    if not 1 <= k <= n_down_blocks:
        raise ValueError(f"depth shallow:K expects 1 <= K <= {n_down_blocks} (the backbone's down blocks), but got {k}")
    return k, False


def residual_blocks(config) -> list[int]:
    """Down block index of each ControlNet down residual (conv_in's counts as block 0)."""
    owners = [0]
    n = len(config.down_block_types)
    for i in range(n):
        owners += [i] * (config.layers_per_block + (1 if i < n - 1 else 0))
    return owners


def apply_depth(controlnet: ControlNetModel, depth: str) -> ControlNetModel:
    """Zero and freeze the zero convolutions (and unused encoder blocks) that `depth` drops."""
    cfg = controlnet.config
    k, mid = parse_depth(depth, len(cfg.down_block_types))
    zero_convs = [conv for conv, block in zip(controlnet.controlnet_down_blocks, residual_blocks(cfg)) if block >= k]
    unused = []
    if not mid:
        zero_convs.append(controlnet.controlnet_mid_block)
        # Encoder stages after K only feed dropped residuals: no gradient ever reaches them.
        unused = [controlnet.mid_block, *controlnet.down_blocks[k:]]
    with torch.no_grad():
        for conv in zero_convs:
            for p in conv.parameters():
                p.zero_()
    for module in zero_convs + unused:
        module.requires_grad_(False)
    controlnet.register_to_config(synthmed_depth=depth)
    return controlnet


def build_controlnet(unet: UNet2DConditionModel, vae_scale_factor: int, conditioning_channels: int = 3, depth: str = "deep",
                     init: Path | None = None) -> ControlNetModel:
    """A ControlNet whose encoder is a copy of the UNet's (zero-initialised output convolutions),
    or warm-started from a saved ControlNet folder (`init`), restricted to `depth`."""
    if init is not None:
        controlnet = load_controlnet(init)
        check_compatible(controlnet, unet, conditioning_channels, Path(init))
    else:
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=embedding_channels(vae_scale_factor),
            conditioning_channels=conditioning_channels,
        )
    return apply_depth(controlnet.requires_grad_(True), depth)


def check_compatible(controlnet: ControlNetModel, unet: UNet2DConditionModel, conditioning_channels: int, where: Path) -> None:
    """A warm-start ControlNet must match the backbone UNet's encoder and the data's channels."""
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types", "in_channels"):
        a, b = _plain(controlnet.config.get(key)), _plain(unet.config.get(key))
        if a is not None and b is not None and a != b:
            raise SynthmedError(f"{where}: ControlNet {key} {a} does not match the backbone UNet's {b}")
    if controlnet.config.conditioning_channels != conditioning_channels:
        raise SynthmedError(f"{where}: ControlNet takes {controlnet.config.conditioning_channels} conditioning channels, the data has {conditioning_channels}")


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def load_controlnet(folder: Path) -> ControlNetModel:
    """Load a saved ControlNet folder, with a one-line error if it is not one."""
    require_weights(folder, "ControlNet")
    try:
        return ControlNetModel.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise SynthmedError(f"{folder}: cannot load ControlNet ({str(exc).splitlines()[0]})") from None


class ControlledUNet(torch.nn.Module):
    """The frozen backbone UNet steered by a ControlNet (or, with controlnet=None, the UNet alone).

    One module holds every trainable part (ControlNet, UNet LoRA, an unlocked UNet decoder), so
    accelerate/DDP synchronises them together; checkpoints keep only the trainable weights.
    """

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel | None = None):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """Model output (B, C, h, w) for noisy latents (B, C, h, w), timesteps (B,), text (B, L, D), cond (B, Cc, H, W)."""
        down = mid = None
        if self.controlnet is not None:
            down, mid = self.controlnet(noisy, t, emb, controlnet_cond=cond, conditioning_scale=scale, return_dict=False)
        return self.unet(noisy, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

"""LoRA on the backbone UNet (peft), saved and loaded in diffusers' LoRA format.

The adapters sit on the attention projections (to_q, to_k, to_v, to_out.0), as in diffusers'
LoRA training examples. A saved folder holds `pytorch_lora_weights.safetensors`, which
`StableDiffusionPipeline.load_lora_weights(folder)` reads without synthmed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from synthmed.core.io import SynthmedError

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Attach a trainable LoRA adapter (fp32) to the UNet's attention; returns its parameters."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"add_lora expects rank >= 1, but got {rank}")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()  # trained in fp32 even when the frozen UNet is fp16/bf16
        p.requires_grad_(True)
    return params


def save_lora(unet: UNet2DConditionModel, folder: Path) -> None:
    """Write the UNet's LoRA weights in diffusers' format (safetensors)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)


def load_lora(unet: UNet2DConditionModel, folder: Path, fuse: bool = True) -> UNet2DConditionModel:
    """Load LoRA weights saved by `save_lora` into the UNet, fused into its weights by default."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise SynthmedError(f"{folder}: no {WEIGHTS} (not a LoRA folder)")
    unet.load_lora_adapter(str(folder), prefix="unet", weight_name=WEIGHTS, adapter_name="synthmed", use_safetensors=True)
    if fuse:
        unet.fuse_lora(lora_scale=1.0)
        unet.unload_lora()
    return unet

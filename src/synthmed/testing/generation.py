"""Helpers for the generation tests: a model folder as `train controlnet` writes it, without training."""

from __future__ import annotations

from pathlib import Path

import torch

from synthmed.core.io import write_json
from synthmed.models.backbone import load_backbone
from synthmed.models.controlnet import build_controlnet


def model_folder(backbone_dir: Path, out: Path, channels: int = 3, seed: int = 0) -> Path:
    """RUN/controlnet + RUN/training.json over `backbone_dir`, with seeded random zero-convolutions
    (so that the conditioning changes the image, as after training)."""
    bb = load_backbone(backbone_dir)
    torch.manual_seed(seed)
    cn = build_controlnet(bb.unet, bb.vae_scale_factor, channels)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    out = Path(out)
    cn.save_pretrained(out / "controlnet", safe_serialization=True)
    write_json(out / "training.json", {"backbone": str(backbone_dir), "outputs": {"controlnet": "controlnet"}, "conditioning_mode": "both",
                                       "prompt_source": "text"})
    return out

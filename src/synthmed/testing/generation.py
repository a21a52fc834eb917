"""Helpers for the generation and study tests: a model folder as `train controlnet` writes it, without training;
a synthetic set whose provenance derives from a fraction of the real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from synthmed.core.io import write_json
from synthmed.data.metadata import read_metadata
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


def fraction_synthetic_set(real: Path, dst: Path, ids: list[str]) -> Path:
    """A synthetic set of fraction-derived provenance: a copy of `real`'s training tiles, each row's source mask one
    of `ids` and its model (dst.parent / "model") trained on `ids` only."""
    shutil.copytree(real, dst)
    (dst.parent / "model").mkdir()
    write_json(dst.parent / "model" / "training.json", {"train_ids": ids})
    meta = dst / "train" / "metadata.jsonl"
    rows = read_metadata(meta)
    for r, sid in zip(rows, ids * len(rows)):
        r["provenance"] = {"source_mask_id": sid, "source_split": "train", "model": str(dst.parent / "model")}
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst

"""Plausibility: does a segmenter trained on real data only find, in each generated image, the mask it was
generated from? Dice/IoU against the conditioning masks, against shuffled masks (the control) and on real
test images (the reference), with per-image bootstrap intervals; and the filter's kept vs rejected draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthmed.evaluation.metrics import derangement, dice_iou, dice_per_image
from synthmed.evaluation.sections import interval
from synthmed.models.tasknets import predict

SEGMENTER = "MONAI UNet (16-32-64-128, residual), Dice+CE, trained on the real train split only"


def plausibility(seg, syn, test, classes: list[str], cfg) -> dict:
    """The plausibility section for synthetic split `syn` and real test split `test` (both with masks)."""
    k = len(classes)
    pred_syn, pred_test = predict(seg, syn.images), predict(seg, test.images)
    perm = derangement(len(syn), cfg.seed)
    real_test = dice_iou(pred_test, test.masks, classes)
    generated = dice_iou(pred_syn, syn.masks, classes)
    shuffled = dice_iou(pred_syn, syn.masks[perm], classes)
    return {
        "dice_generated": generated["dice"],
        "dice_shuffled": shuffled["dice"],
        "dice_real_test": real_test["dice"],
        "iou_generated": generated["iou"],
        "iou_shuffled": shuffled["iou"],
        "iou_real_test": real_test["iou"],
        "dice_foreground_generated": generated["dice_foreground"],
        "dice_foreground_shuffled": shuffled["dice_foreground"],
        "dice_foreground_real_test": real_test["dice_foreground"],
        "per_class": {"generated": generated["per_class"], "shuffled": shuffled["per_class"], "real_test": real_test["per_class"]},
        "n_generated": len(syn),
        "n_real_test": len(test),
        "segmenter": SEGMENTER,
        "intervals": {  # per-image Dice (mean over the classes each image contains), mean with 95% bootstrap CI
            "dice_generated": interval(dice_per_image(pred_syn, syn.masks, k), cfg),
            "dice_shuffled": interval(dice_per_image(pred_syn, syn.masks[perm], k), cfg),
            "dice_real_test": interval(dice_per_image(pred_test, test.masks, k), cfg),
        },
    }


def generation_summary(synthetic: Path, seg, classes: list[str], dice_kept: float) -> dict | None:
    """The plan, the filter's counts, and this (independent) segmenter's Dice on kept vs rejected draws."""
    from synthmed.core.io import load_png, read_json
    from synthmed.data.metadata import read_metadata

    card = read_json(Path(synthetic) / "dataset.json")
    if "plan" not in card:
        return None
    out = {"plan": card["plan"], "filter": card.get("filter"), "filter_summary": card.get("filter_summary"), "dice_kept": dice_kept}
    rejected = Path(synthetic) / "rejected" / "metadata.jsonl"
    if rejected.is_file():
        rows = read_metadata(rejected)
        images = np.stack([load_png(rejected.parent / r["file_name"])[..., :3] for r in rows])
        masks = np.stack([load_png(_layout_mask(Path(synthetic), r["id"])) for r in rows])
        out["dice_rejected_draws"] = dice_iou(predict(seg, images), masks, classes)["dice"]
        out["n_rejected_draws"] = len(rows)
    return out


def _layout_mask(synthetic: Path, sid: str) -> Path:
    """The mask a draw was conditioned on: kept samples' in train/masks, dropped ones' in rejected/layouts."""
    kept = synthetic / "train" / "masks" / f"{sid}.png"
    return kept if kept.is_file() else synthetic / "rejected" / "layouts" / f"{sid}_masks.png"

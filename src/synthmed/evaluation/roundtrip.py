"""The round-trip ceiling: what a backbone's autoencoder can carry of real images, per class.

A latent diffusion model draws in the VAE's latent space, so nothing it generates can hold a
structure that the VAE's decoder cannot draw back from the encoding of a real image. Before any
ControlNet training this says, for a user's own data and backbone (the shipped tiny ones or SD 1.5),
whether the latent space keeps the rare structures at all:

- the mean absolute reconstruction error (grey levels, 0-255, mean over channels) on the pixels of each
  mask class (segmentation) or on the images of each label (classification), background included;
- the rare class's error against the mean of the other foreground classes (1: as well kept);
- given a segmentation judge trained on real images: its per-class Dice on the round-tripped images next
  to its Dice on the originals (the ratio is the share of what it finds that survives the round trip).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def reconstruct(backbone, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> their VAE round trips (latent means, decoded), uint8."""
    from synthmed.training.common import to_model_range

    vae = backbone.vae
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i : i + batch_size]).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out.append(((rec.float().cpu() + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8))
    return np.concatenate(out)


def class_errors(images: np.ndarray, recon: np.ndarray, masks: np.ndarray | None, classes: list[str], labels: list[str] | None = None) -> dict:
    """{class: {"mae", "n"}}: error per mask class (pixels; "background" too) or per image label (images)."""
    err = np.abs(recon.astype(np.float64) - images.astype(np.float64)).mean(-1)  # (N, H, W)
    out = {}
    if masks is not None:
        for code, name in enumerate(["background", *classes]):
            sel = masks == code
            out[name] = {"mae": float(err[sel].mean()) if sel.any() else None, "n": int(sel.sum())}
        return out
    per_image = err.mean((1, 2))
    for name in classes:
        sel = np.array([lab == name for lab in (labels or [])], bool)
        out[name] = {"mae": float(per_image[sel].mean()) if sel.any() else None, "n": int(sel.sum())}
    return out


def rare_ratio(errors: dict, rare: str, classes: list[str]) -> float | None:
    """The rare class's error over the mean error of the other (foreground) classes."""
    others = [errors[c]["mae"] for c in classes if c != rare and errors.get(c, {}).get("mae") is not None]
    mine = errors.get(rare, {}).get("mae")
    return None if mine is None or not others else float(mine / np.mean(others))


def judged(segmenter, images: np.ndarray, recon: np.ndarray, masks: np.ndarray, classes: list[str]) -> dict:
    """A real-trained judge's per-class Dice on the originals and on their round trips, and the ratio."""
    from synthmed.evaluation.metrics import dice_iou
    from synthmed.models.tasknets import predict

    on_real = dice_iou(predict(segmenter, images), masks, classes)
    on_rec = dice_iou(predict(segmenter, recon), masks, classes)
    out = {}
    for c in classes:
        a, b = on_real["per_class"][c]["dice"], on_rec["per_class"][c]["dice"]
        out[c] = {"dice_original": a, "dice_round_trip": b, "ratio": None if a is None or b is None or a <= 0 else float(b / a)}
    out["mean"] = {"dice_original": on_real["dice"], "dice_round_trip": on_rec["dice"],
                   "ratio": None if not on_real["dice"] else float(on_rec["dice"] / on_real["dice"])}
    return out


def rarest(masks: np.ndarray | None, classes: list[str], labels: list[str] | None = None) -> str:
    """The class with the fewest pixels (masks) or images (labels) that is present at all."""
    if masks is not None:
        counts = np.bincount(masks.ravel(), minlength=len(classes) + 1)[1 : len(classes) + 1]
    else:
        counts = np.array([sum(lab == c for lab in labels or []) for c in classes])
    present = [(n, c) for n, c in zip(counts, classes) if n > 0]
    return min(present)[1] if present else classes[0]


def round_trip(backbone, images: np.ndarray, masks: np.ndarray | None, classes: list[str], rare: str | None = None,
               labels: list[str] | None = None, segmenter=None) -> dict:
    """The whole check on one split (module doc)."""
    recon = reconstruct(backbone, images)
    rare = rare or rarest(masks, classes, labels)
    errors = class_errors(images, recon, masks, classes, labels)
    res = {"n_images": len(images), "unit": "pixels" if masks is not None else "images", "rare_class": rare,
           "mae": errors, "rare_vs_other_classes": rare_ratio(errors, rare, classes)}
    if segmenter is not None and masks is not None:
        res["judge"] = judged(segmenter, images, recon, masks, classes)
    return res, recon

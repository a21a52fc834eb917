"""The round-trip ceiling: what a backbone's autoencoder can carry of real images, per class.

A latent diffusion model draws in the VAE's latent space, so nothing it generates can hold a
structure that the VAE's decoder cannot draw back from the encoding of a real image. Before any
ControlNet training this says, for a user's own data and backbone (the shipped tiny ones or SD 1.5),
whether the latent space keeps the rare structures at all:

- the mean absolute reconstruction error (grey levels, 0-255, mean over channels) on the pixels of each
  mask class (segmentation) or on the images of each label (classification), background included;
- the rare class's error against the mean of the other foreground classes (1: as well kept);
- given a segmentation judge trained on real images: its per-class Dice on the round-tripped images next
  to its Dice on the originals (the ratio is the share of what it finds that survives the round trip);
- for a trained model with a conditioned refiner (models/refiner.py), the same on the refined round trips: what
  generation draws through, since it decodes and refines with the conditioning of the same masks.
"""

from __future__ import annotations

import numpy as np
import torch


def _refines(backbone, cond) -> bool:
    """Whether round trips are also refined: the backbone has a conditioned refiner and the conditioning is given."""
    return cond is not None and getattr(backbone, "refiner", None) is not None


@torch.no_grad()
def reconstruct(backbone, images: np.ndarray, batch_size: int = 32, cond: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """(N, H, W, 3) uint8 images -> {"round trip": their VAE round trips (latent means, decoded)} uint8; with `cond`
    (N, H, W, C) uint8 and a backbone that has a refiner (models/refiner.py), also "refined": the same decoded images
    refined with their conditioning, as generation does (one encode and decode serves both)."""
    from synthmed.models.refiner import refine
    from synthmed.models.tasknets import to_unit_range
    from synthmed.training.common import to_model_range

    vae = backbone.vae
    refined = _refines(backbone, cond)
    out = {"round trip": [], **({"refined": []} if refined else {})}
    as_uint8 = lambda t: ((t.float().cpu() + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)  # noqa: E731
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i : i + batch_size]).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out["round trip"].append(as_uint8(rec))
        if refined:
            out["refined"].append(as_uint8(refine(backbone.refiner, rec, to_unit_range(cond[i : i + batch_size]))))
    return {k: np.concatenate(v) for k, v in out.items()}


class ClassErrors:
    """Mean absolute round-trip error per mask class (pixels; "background" too) or per image label (images),
    accumulated over batches (`add`); `result()` is {class: {"mae", "n"}}."""

    def __init__(self, classes: list[str], per_pixel: bool):
        self.names = ["background", *classes] if per_pixel else list(classes)
        self.per_pixel = per_pixel
        self.sums, self.counts = np.zeros(len(self.names)), np.zeros(len(self.names), np.int64)

    def add(self, images: np.ndarray, recon: np.ndarray, masks: np.ndarray | None = None, labels: list[str] | None = None) -> None:
        err = np.abs(recon.astype(np.float64) - np.asarray(images).astype(np.float64)).mean(-1)  # (n, H, W)
        if self.per_pixel:
            codes = np.asarray(masks).ravel()
            self.sums += np.bincount(codes, weights=err.ravel(), minlength=len(self.names))[: len(self.names)]
            self.counts += np.bincount(codes, minlength=len(self.names))[: len(self.names)]
            return
        per_image = err.mean((1, 2))
        for i, name in enumerate(self.names):
            sel = np.array([lab == name for lab in (labels or [])], bool)
            self.sums[i] += per_image[sel].sum()
            self.counts[i] += sel.sum()

    def result(self) -> dict:
        return {name: {"mae": float(s / n) if n else None, "n": int(n)} for name, s, n in zip(self.names, self.sums, self.counts)}


def class_errors(images: np.ndarray, recon: np.ndarray, masks: np.ndarray | None, classes: list[str], labels: list[str] | None = None) -> dict:
    """{class: {"mae", "n"}}: error per mask class (pixels; "background" too) or per image label (images)."""
    acc = ClassErrors(classes, masks is not None)
    acc.add(images, recon, masks, labels)
    return acc.result()


def rare_ratio(errors: dict, rare: str, classes: list[str]) -> float | None:
    """The rare class's error over the mean error of the other (foreground) classes."""
    others = [errors[c]["mae"] for c in classes if c != rare and errors.get(c, {}).get("mae") is not None]
    mine = errors.get(rare, {}).get("mae")
    return None if mine is None or not others else float(mine / np.mean(others))


def _judge_table(on_real: dict, on_rec: dict, classes: list[str]) -> dict:
    """A real-trained judge's per-class Dice on the originals and on their round trips (`dice_iou` results), and the ratio."""
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
        from synthmed.data.arrays import code_counts

        counts = code_counts(masks, len(classes) + 1)[1:]  # in chunks: the masks may be a split on disk
    else:
        counts = np.array([sum(lab == c for lab in labels or []) for c in classes])
    present = [(n, c) for n, c in zip(counts, classes) if n > 0]
    return min(present)[1] if present else classes[0]


def round_trip(backbone, images: np.ndarray, masks: np.ndarray | None, classes: list[str], rare: str | None = None,
               labels: list[str] | None = None, segmenter=None, keep: int | None = None, chunk: int = 256,
               cond: np.ndarray | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The whole check on one split (module doc), `chunk` images at a time (the split may be on disk): the
    results and {"round trip": the round trips of the first `keep` images (all when None)}. With a backbone that has
    a refiner and the split's conditioning `cond`, the same check again on the refined round trips (what generation
    draws through): results["refined"] and the images under "refined"."""
    from synthmed.evaluation.metrics import DiceIoU
    from synthmed.models.tasknets import predict

    rare = rare or rarest(masks, classes, labels)
    kinds = ["round trip"] + (["refined"] if _refines(backbone, cond) else [])
    errors = {k: ClassErrors(classes, masks is not None) for k in kinds}
    judge = segmenter is not None and masks is not None
    on_real, on_rec = DiceIoU(classes), {k: DiceIoU(classes) for k in kinds}
    kept = {k: [] for k in kinds}
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i : i + chunk])
        m = np.asarray(masks[i : i + chunk]) if masks is not None else None
        if judge:
            on_real.add(predict(segmenter, x), m)
        recons = reconstruct(backbone, x, cond=None if cond is None else cond[i : i + chunk])
        for k, recon in recons.items():
            errors[k].add(x, recon, m, None if labels is None else labels[i : i + chunk])
            if judge:
                on_rec[k].add(predict(segmenter, recon), m)
            if keep is None or sum(map(len, kept[k])) < keep:
                kept[k].append(recon)

    def section(k: str) -> dict:
        errs = errors[k].result()
        return {"mae": errs, "rare_vs_other_classes": rare_ratio(errs, rare, classes),
                **({"judge": _judge_table(on_real.result(), on_rec[k].result(), classes)} if judge else {})}

    res = {"n_images": len(images), "unit": "pixels" if masks is not None else "images", "rare_class": rare, **section("round trip")}
    if "refined" in kinds:
        res["refined"] = section("refined")
    recons = {k: np.concatenate(v)[:keep] if v else np.zeros((0, *images.shape[1:]), np.uint8) for k, v in kept.items()}
    return res, recons

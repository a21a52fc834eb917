"""Metrics as pure functions on arrays (MONAI underneath), with per-class detail."""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU


def one_hot(masks: np.ndarray, n_classes: int) -> torch.Tensor:
    """(N, H, W) codes 0..n_classes -> (N, n_classes + 1, H, W) float one-hot."""
    t = torch.as_tensor(np.asarray(masks), dtype=torch.long)
    if t.ndim != 3:
        raise ValueError(f"one_hot expects (N, H, W) masks, but got shape {tuple(t.shape)}")
    if t.numel() and (t.min() < 0 or t.max() > n_classes):
        raise ValueError(f"one_hot expects codes in 0..{n_classes}, but got {int(t.min())}..{int(t.max())}")
    return torch.nn.functional.one_hot(t, n_classes + 1).permute(0, 3, 1, 2).float()


class DiceIoU:
    """Dice and IoU per foreground class, accumulated over batches of (pred, target) code maps (`add`), then
    `result()`: the numbers of one `dice_iou` call on all of them, without holding every map at once."""

    def __init__(self, class_names: list[str]):
        self.classes = list(class_names)
        self.metrics = {"dice": DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True),
                        "iou": MeanIoU(include_background=False, reduction="mean_batch", ignore_empty=True)}
        self.fg = DiceMetric(include_background=True, reduction="mean", ignore_empty=True)
        self.present = torch.zeros(len(self.classes))
        self.n = 0

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"dice_iou expects equal shapes, but got {pred.shape} and {target.shape}")
        p, t = one_hot(pred, len(self.classes)), one_hot(target, len(self.classes))
        for metric in self.metrics.values():
            metric(p, t)
        self.present += t[:, 1:].sum(dim=(0, 2, 3))
        self.fg(torch.as_tensor((pred > 0)[:, None], dtype=torch.float32), torch.as_tensor((target > 0)[:, None], dtype=torch.float32))
        self.n += len(pred)

    def result(self) -> dict:
        absent = (self.present == 0).numpy()  # MONAI reports 0 there; it is "not applicable"
        per_class = {name: np.where(absent, np.nan, metric.aggregate().cpu().numpy()) for name, metric in self.metrics.items()}  # (K,)
        return {
            "dice": _nanmean(per_class["dice"]),
            "iou": _nanmean(per_class["iou"]),
            "dice_foreground": float(self.fg.aggregate()),
            "per_class": {n: {"dice": _num(d), "iou": _num(i)} for n, d, i in zip(self.classes, per_class["dice"], per_class["iou"])},
            "n_images": self.n,
        }


def dice_iou(pred: np.ndarray, target: np.ndarray, class_names: list[str], chunk: int = 256) -> dict:
    """Dice and IoU per foreground class and their mean over classes.

    A class's score averages the images whose target contains it (MONAI's ignore_empty), so
    a rare class is scored where it exists; the mean is over classes that occur at all.
    Images go through in chunks of `chunk` (one-hot maps are K + 1 floats per pixel; either array
    may be a split on disk), accumulated by `DiceIoU`: the scores are those of one pass on everything.
    """
    if pred.shape != target.shape:
        raise ValueError(f"dice_iou expects equal shapes, but got {pred.shape} and {target.shape}")
    acc = DiceIoU(class_names)
    for start in range(0, max(len(pred), 1), chunk):
        acc.add(pred[start:start + chunk], target[start:start + chunk])
    return acc.result()


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (each item paired with another's mask)."""
    if n < 2:
        raise ValueError(f"derangement expects n >= 2, but got {n}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _num(x) -> float | None:
    return None if not np.isfinite(x) else float(x)


def dice_per_image(pred: np.ndarray, target: np.ndarray, n_classes: int, chunk: int = 256) -> np.ndarray:
    """(N,) Dice of each image, averaged over the foreground classes its target contains.

    An image whose target is all background scores 1 if the prediction is too, else 0. Images go through
    `chunk` at a time (either array may be a split on disk)."""
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"dice_per_image expects equal shapes, but got {tuple(pred.shape)} and {tuple(target.shape)}")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    out = []
    for start in range(0, len(pred), chunk):
        p, t = np.asarray(pred[start : start + chunk]), np.asarray(target[start : start + chunk])
        scores = metric(one_hot(p, n_classes), one_hot(t, n_classes)).numpy()  # (n, K), nan where absent
        empty = ~np.isfinite(scores).any(1)
        mean = np.where(empty, 0.0, np.nanmean(np.where(empty[:, None], 0.0, scores), axis=1))
        out.append(np.where(empty, (p.reshape(len(p), -1) == 0).all(1).astype(float), mean))
    return np.concatenate(out) if out else np.zeros(0)

"""Downstream utility: train a segmentation or classification model on one arm's training pool and
score it on the real test split. One call = one cell of a study (fraction x arm x seed).

Arms differ only in what the batches are drawn from and how they are augmented:
- real: the real training subset, no augmentation beyond what every arm gets (none);
- real+synthetic: real + synthetic samples, `mix` of each batch drawn from the synthetic pool;
- synthetic-only: the synthetic pool alone (validation and test stay real);
- real+classic: the real subset with classic augmentation (MONAI: flips, 90-degree rotations, affine,
  intensity), the honest baseline a synthetic-data method has to beat;
- real+synthetic+classic: both (does synthetic data add to what augmentation already gives?).
Early stopping on the real validation split keeps the best weights; the test split is only scored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from synthmed.training.common import optimiser_step, warmup_cosine
from synthmed.models.tasknets import to_unit_range

ARMS = ("real", "real+synthetic", "synthetic-only", "real+classic", "real+synthetic+classic")
TASKS = ("segmentation", "classification")


@dataclass
class Pool:
    """Training samples: (N, H, W, C) uint8 images and targets ((N, H, W) codes or (N,) labels)."""

    images: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def balanced_p(self) -> np.ndarray:
        """Draw probabilities 1 / (count of the sample's label), normalised: every label equally likely per draw."""
        p = 1.0 / np.bincount(self.targets)[self.targets]
        return p / p.sum()


@dataclass
class TrainSettings:
    """How one cell trains: a step budget with early stopping on the real validation split."""

    max_steps: int = 1500
    eval_every: int = 100
    patience: int = 4  # evaluations without improvement before stopping
    batch_size: int = 16
    lr: float = 2e-3
    mix: float | None = 0.5  # share of each batch from the synthetic pool (real+synthetic); None: in proportion to pool sizes
    arch: str = "resnet"  # classification: resnet | densenet
    class_balanced: bool = True  # classification: batches drawn by inverse class frequency
    curve: list = field(default_factory=list)


def arm_pools(arm: str, real: Pool, synthetic: Pool | None) -> tuple[list[Pool], bool]:
    """The pools an arm draws from and whether it uses classic augmentation."""
    if arm not in ARMS:
        raise ValueError(f"arm_pools expects arm in {ARMS}, but got {arm!r}")
    if "synthetic" in arm and (synthetic is None or len(synthetic) == 0):
        raise ValueError(f"arm_pools expects a non-empty synthetic pool for arm {arm!r}, but got none")
    pools = {"real": [real], "real+classic": [real], "real+synthetic": [real, synthetic], "real+synthetic+classic": [real, synthetic],
             "synthetic-only": [synthetic]}[arm]
    return pools, arm.endswith("+classic")


def draw(pools: list[Pool], batch_size: int, step: int, seed: int, mix: float | None, balanced_labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """One batch (images, targets), a pure function of (seed, step): a binomial share from the second pool,
    class-balanced within each pool for classification."""
    rng = np.random.default_rng([seed, step, 17])
    if len(pools) == 2:
        share = mix if mix is not None else len(pools[1]) / (len(pools[0]) + len(pools[1]))
        n_syn = int(rng.binomial(batch_size, share))
        sizes = [batch_size - n_syn, n_syn]
    else:
        sizes = [batch_size]
    images, targets = [], []
    for pool, n in zip(pools, sizes):
        if n == 0:
            continue
        idx = rng.choice(len(pool), n, replace=True, p=pool.balanced_p if balanced_labels else None)
        images.append(pool.images[idx])
        targets.append(pool.targets[idx])
    return np.concatenate(images), np.concatenate(targets)


def classic_augmentation(task: str, seed: int):
    """MONAI dictionary transforms on one (C, H, W) image (+ (1, H, W) mask): flips, 90-degree rotations,
    a small affine (rotation, scale; nearest for masks), Gaussian noise, contrast and intensity jitter."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised, RandRotate90d,
                                  RandScaleIntensityd)

    keys = ["image", "mask"] if task == "segmentation" else ["image"]
    modes = ["bilinear", "nearest"] if task == "segmentation" else ["bilinear"]
    t = Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5, max_k=3),
        RandAffined(keys, prob=0.5, rotate_range=0.26, scale_range=0.1, mode=modes, padding_mode="reflection"),
        RandGaussianNoised("image", prob=0.3, std=0.02),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
        RandScaleIntensityd("image", prob=0.3, factors=0.1),
    ])
    t.set_random_state(seed)
    return t


def _augment(transform, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    for i in range(len(x)):
        d = {"image": x[i]} | ({"mask": y[i].float()} if y is not None else {})
        out = transform(d)
        xs.append(torch.as_tensor(out["image"]).clamp(0, 1))
        if y is not None:
            ys.append(torch.as_tensor(out["mask"]).round().long())
    return torch.stack(xs), (torch.stack(ys) if y is not None else None)


def build_model(task: str, n_classes: int, in_channels: int, arch: str):
    """The downstream model: a MONAI U-Net (segmentation, K + 1 outputs) or ResNet/DenseNet (classification)."""
    if task == "segmentation":
        from synthmed.models.tasknets import build_segmenter

        return build_segmenter(n_classes, in_channels)
    from synthmed.models.tasknets import build_classifier

    return build_classifier(n_classes, in_channels, arch)


def train_cell(task: str, pools: list[Pool], classic: bool, val: Pool, n_classes: int, settings: TrainSettings, seed: int,
               progress=None, device: str = "cpu"):
    """Train one cell's model; returns (model in eval mode with the best validation weights, record).

    The record has the learning curve [(step, mean train loss, validation score)], the best step and score
    and the step training stopped at. Validation score: mean foreground Dice, or balanced accuracy."""
    from monai.losses import DiceCELoss

    if task not in TASKS:
        raise ValueError(f"train_cell expects task in {TASKS}, but got {task!r}")
    torch.manual_seed(seed)
    model = build_model(task, n_classes, pools[0].images.shape[-1], settings.arch).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if task == "segmentation" else None
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, settings.max_steps, warmup_fraction=0.1, floor=0.02)
    transform = classic_augmentation(task, seed) if classic else None
    best = (-np.inf, 0, None)
    curve, losses, stale, step = [], [], 0, 0
    for step in range(1, settings.max_steps + 1):
        model.train()
        xb, yb = draw(pools, settings.batch_size, step, seed, settings.mix, task == "classification" and settings.class_balanced)
        x = to_unit_range(xb)  # (B, C, H, W)
        y = torch.from_numpy(yb.astype(np.int64))
        if task == "segmentation":
            y = y[:, None]  # (B, 1, H, W)
        if transform is not None:
            x, y2 = _augment(transform, x, y if task == "segmentation" else None)
            y = y2 if task == "segmentation" else y
        out = model(x.to(device))
        loss = loss_fn(out, y.to(device)) if loss_fn else F.cross_entropy(out, y.to(device))
        optimiser_step(loss, model.parameters(), opt, sched, clip=None)
        losses.append(loss.item())
        if step % settings.eval_every == 0 or step == settings.max_steps:
            score = validation_score(task, model.eval(), val, n_classes)
            curve.append({"step": step, "train_loss": float(np.mean(losses)), "val_score": score})
            losses = []
            if score > best[0]:
                best, stale = (score, step, copy.deepcopy(model.state_dict())), 0
            else:
                stale += 1
            if stale >= settings.patience:
                break
        if progress:
            progress(step, settings.max_steps, loss.item())
    model.load_state_dict(best[2])
    return model.eval(), {"curve": curve, "best_step": best[1], "best_val_score": float(best[0]), "stopped_at": step,
                          "early_stopped": step < settings.max_steps}


def predict(task: str, model, images: np.ndarray) -> np.ndarray:
    """Segmentation: class-code maps (N, H, W); classification: probabilities (N, K)."""
    if task == "segmentation":
        from synthmed.models.tasknets import predict as seg_predict

        return seg_predict(model, images)
    from synthmed.models.tasknets import predict_proba

    return predict_proba(model, images)


def validation_score(task: str, model, val: Pool, n_classes: int) -> float:
    """The early-stopping score on the real validation split: mean per-image Dice, or balanced accuracy."""
    pred = predict(task, model, val.images)
    if task == "segmentation":
        from synthmed.evaluation.metrics import dice_per_image

        d = dice_per_image(pred, val.targets, n_classes)
        return float(np.nanmean(d)) if np.isfinite(d).any() else 0.0
    labels = pred.argmax(1)
    recalls = [float((labels[val.targets == c] == c).mean()) for c in np.unique(val.targets)]
    return float(np.mean(recalls))


def _ids_under(obj, keys=("source_mask_id", "source_id", "donor_id")) -> set[str]:
    """Every sample id a provenance record names (its layout's source, pasted objects' donors), at any depth."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys and isinstance(v, str):
                found.add(v)
            else:
                found |= _ids_under(v, keys)
    elif isinstance(obj, list):
        for v in obj:
            found |= _ids_under(v, keys)
    return found


def leakage(rows: list[dict], model_train_ids: list[str] | None, allowed: set[str], held_out: set[str]) -> str | None:
    """Why a synthetic set may not train an arm that has only the `allowed` real training ids, or None.

    Refused: a sample drawn from (or pasting objects from) a validation/test sample or a training sample
    outside the arm's subset, a sample from another source split, a model whose training ids are unknown,
    and a model trained on samples outside the subset (more real data than the arm has)."""
    for r in rows:
        prov = r.get("provenance") or {}
        if prov.get("source_split", "train") != "train":
            return f"sample {r.get('id')} was drawn from the {prov['source_split']!r} split"
        named = _ids_under(prov)
        if not named:
            return f"sample {r.get('id')} has no provenance naming its source mask"
        if named & held_out:
            return f"sample {r.get('id')} derives from validation/test sample {sorted(named & held_out)[0]}"
        if named - allowed:
            return f"sample {r.get('id')} derives from training sample {sorted(named - allowed)[0]}, outside this fraction's subset"
    if model_train_ids is None:
        return "its model's training.json does not list the samples it was trained on"
    extra = set(model_train_ids) - allowed
    if extra:
        return f"its model was trained on {len(model_train_ids)} samples, {len(extra)} outside this fraction's subset of {len(allowed)} (e.g. {sorted(extra)[0]})"
    return None

"""Training the task networks (models/tasknets.py) on real data: the segmenter (Dice + CE) and the classifier
(class-balanced cross-entropy), resumable with a PhaseCheckpoint, and a weight cache so that later evaluations against the same real data
load a model instead of training it again."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import DenseNet121, ResNet, UNet

from synthmed.data.arrays import code_counts
from synthmed.models.tasknets import _check_images, _check_labels, build_classifier, build_segmenter, to_unit_range
from synthmed.training.common import PhaseCheckpoint, accumulated_step, batch_indices, dihedral, optimiser_step, step_generator, warmup_cosine


def _seg_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-image brightness/contrast/colour jitter: stain variation the judge must tolerate."""
    b = x.shape[0]
    scale = 1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1)
    shift = 0.05 * (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1)
    return (x * scale + shift).clamp(0, 1)


def class_weights(masks: np.ndarray, n_classes: int, cap: float = 10.0) -> torch.Tensor:
    """Median-frequency balancing (Eigen & Fergus 2015): weight_c = median(freq) / freq_c over the classes present
    (background included), square-rooted and capped, so a class 100x rarer than the median weighs 10x; absent classes 1."""
    counts = code_counts(masks, n_classes + 1).astype(np.float64)  # in chunks: masks may be a DiskArray of a large split
    present = counts > 0
    w = np.ones(n_classes + 1)
    w[present] = np.sqrt(np.median(counts[present]) / counts[present])
    return torch.tensor(np.clip(w, 1.0 / cap, cap), dtype=torch.float32)


def train_segmenter(images: np.ndarray, masks: np.ndarray, n_classes: int, steps: int, batch_size: int, lr: float, seed: int, progress=None,
                    device: str = "cpu", class_weighting: str = "none", checkpoint: PhaseCheckpoint | None = None) -> UNet:
    """Train on (N, H, W, 3) uint8 images and (N, H, W) codes with Dice + cross-entropy; class_weighting
    "median_frequency" weights the cross-entropy by `class_weights` (a judge that sees a rare class).
    With `checkpoint`, an interrupted training continues from its last save (batches are functions of (seed, step))."""
    torch.manual_seed(seed)
    model = build_segmenter(n_classes, images.shape[-1]).to(device)
    # Batches are converted as they are drawn (images and masks may be DiskArrays of a large split): uint8 stays
    # the only copy in memory, and the numbers are those of converting everything first.
    weight = class_weights(masks, n_classes).to(device) if class_weighting == "median_frequency" else None
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, warmup_fraction=0.1, floor=0.02)
    checkpoint = checkpoint or PhaseCheckpoint(None, "segmenter", 1)
    start, losses = checkpoint.restore(model, opt, sched)
    model.train()
    for step in range(start, steps):
        g = step_generator(seed, step, stream=9)
        idx = batch_indices(len(images), batch_size, step, seed + 9).numpy()
        k = int(torch.randint(0, 8, (1,), generator=g))
        x = dihedral(to_unit_range(images[idx]), k)  # (B, 3, H, W)
        y = dihedral(torch.from_numpy(np.asarray(masks[idx]).astype(np.int64))[:, None], k)  # (B, 1, H, W)
        loss = accumulated_step(lambda xs, ys: loss_fn(model(xs.to(device)), ys.to(device)), _seg_jitter(x, g), y, model.parameters(), opt, sched, clip=None)
        losses.append(loss)
        checkpoint.maybe_save(step + 1, steps, model, opt, sched, losses)
        if progress:
            progress(step + 1, steps, losses[-1])
    return model.eval()


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-image brightness/contrast/colour jitter (any channel count): stain and scanner variation."""
    b, c = x.shape[:2]
    scale = 1 + 0.1 * (torch.rand(b, c, 1, 1, generator=g) * 2 - 1)
    shift = 0.05 * (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1)
    return (x * scale + shift).clamp(0, 1)


def balanced_indices(labels: torch.Tensor, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Batch indices drawn with probability 1 / (count of the sample's class): every class equally
    likely per draw; like `batch_indices`, a pure function of (seed, step)."""
    counts = torch.bincount(labels)
    weights = 1.0 / counts[labels].double()
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.multinomial(weights, batch_size, replacement=True, generator=g)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress=None,
    device: str = "cpu",
    class_balanced: bool = True,
    arch: str = "resnet",
    checkpoint: PhaseCheckpoint | None = None,
) -> ResNet | DenseNet121:
    """Train on (N, H, W, C) uint8 images and (N,) class labels with cross-entropy; returns it in eval mode.

    class_balanced draws batches by inverse class frequency rather than weighting the loss: with a
    rare class, loss weights leave most batches without it and give the few that have it large,
    noisy gradients, while sampling puts it in nearly every batch (and in BatchNorm's statistics)
    at a plain mean loss. Repeating few rare images is tempered by the dihedral + jitter augmentation.
    """
    _check_images("train_classifier", images)
    _check_labels("train_classifier", labels, len(images), n_classes)
    if len(images) == 0 or steps < 1 or batch_size < 2:
        raise ValueError(f"train_classifier expects N >= 1, steps >= 1 and batch_size >= 2 (BatchNorm), but got N={len(images)}, steps={steps}, batch_size={batch_size}")
    torch.manual_seed(seed)
    model = build_classifier(n_classes, images.shape[-1], arch, image_size=min(images.shape[1:3])).to(device)
    y_all = torch.from_numpy(np.asarray(labels).astype(np.int64))  # (N,); images are converted batch by batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, warmup_fraction=0.1, floor=0.02)
    checkpoint = checkpoint or PhaseCheckpoint(None, "classifier", 1)
    start, losses = checkpoint.restore(model, opt, sched)
    model.train()
    for step in range(start, steps):
        g = step_generator(seed, step, stream=11)
        idx = balanced_indices(y_all, batch_size, step, seed + 11) if class_balanced else batch_indices(len(images), batch_size, step, seed + 11)
        k = int(torch.randint(0, 8, (1,), generator=g))
        x = _jitter(dihedral(to_unit_range(images[idx.numpy()]), k), g)
        loss = F.cross_entropy(model(x.to(device)), y_all[idx].to(device))
        optimiser_step(loss, model.parameters(), opt, sched, clip=None)
        losses.append(loss.item())
        checkpoint.maybe_save(step + 1, steps, model, opt, sched, losses)
        if progress:
            progress(step + 1, steps, losses[-1])
    return model.eval()


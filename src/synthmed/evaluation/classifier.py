"""A MONAI image classifier trained on real data: the judge of class identity.

Used by the generation quality filter (confidence for the intended class), as the domain
feature extractor of FID-like metrics (its penultimate layer) and in downstream experiments.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, ResNet

from synthmed.training.common import batch_indices, dihedral, optimiser_step, step_generator, to_unit_range, warmup_cosine

ARCHS = ("resnet", "densenet")
RESNET_WIDTHS = (32, 64, 128, 256)  # half of ResNet-18's (64, ..., 512): ~2.8M parameters, features D = 256
DENSENET_MIN_SIZE = 32  # DenseNet121 downsamples by 32; smaller inputs would pool to 0 x 0


def build_classifier(n_classes: int, in_channels: int = 3, arch: str = "resnet") -> ResNet | DenseNet121:
    """A 2D MONAI classifier with n_classes logits.

    "resnet": monai ResNet with ResNet-18's layout (basic blocks, [2, 2, 2, 2]) at RESNET_WIDTHS, and a
    3x3 stride-1 stem + max-pool (total stride 16) so 28 px images keep a 2 x 2 final map.
    "densenet": the stock monai DenseNet121 (features D = 1024); inputs under 32 px are upsampled by a
    forward pre-hook, so any caller (also `model(x)` directly) can give it 28 px images.
    """
    if n_classes < 2:
        raise ValueError(f"build_classifier expects n_classes >= 2, but got {n_classes}")
    if in_channels < 1:
        raise ValueError(f"build_classifier expects in_channels >= 1, but got {in_channels}")
    if arch == "resnet":
        return ResNet("basic", [2, 2, 2, 2], list(RESNET_WIDTHS), spatial_dims=2, n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=1, num_classes=n_classes)
    if arch == "densenet":
        model = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=n_classes)
        model.register_forward_pre_hook(_upsample_small_inputs)
        return model
    raise ValueError(f"build_classifier expects arch in {ARCHS}, but got {arch!r}")


def _upsample_small_inputs(module, args):
    """Forward pre-hook: bilinear upsampling of (B, C, H, W) inputs to at least DENSENET_MIN_SIZE."""
    (x,) = args
    h, w = x.shape[-2:]
    if min(h, w) >= DENSENET_MIN_SIZE:
        return None
    scale = DENSENET_MIN_SIZE / min(h, w)
    size = (max(DENSENET_MIN_SIZE, round(h * scale)), max(DENSENET_MIN_SIZE, round(w * scale)))
    return (F.interpolate(x, size=size, mode="bilinear", align_corners=False),)


def _head(model: torch.nn.Module) -> torch.nn.Linear:
    """The final linear layer: `fc` of a monai ResNet, `class_layers.out` of a monai DenseNet."""
    return model.fc if isinstance(model, ResNet) else model.class_layers.out


def feature_dim(model: torch.nn.Module) -> int:
    """D of `features`: 256 for "resnet", 1024 for "densenet"."""
    return _head(model).in_features


def _check_images(name: str, images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"{name} expects (N, H, W, C) uint8 images, but got {got}")


def _check_labels(name: str, labels: np.ndarray, n: int, n_classes: int) -> None:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{name} expects (N,) labels with N = {n}, but got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} expects integer labels, but got {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{name} expects labels in [0, {n_classes}), but got [{labels.min()}, {labels.max()}]")


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
    model = build_classifier(n_classes, images.shape[-1], arch).to(device)
    x_all = to_unit_range(images)  # (N, C, H, W)
    y_all = torch.from_numpy(np.asarray(labels).astype(np.int64))  # (N,)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, warmup_fraction=0.1, floor=0.02)
    model.train()
    for step in range(steps):
        g = step_generator(seed, step, stream=11)
        idx = balanced_indices(y_all, batch_size, step, seed + 11) if class_balanced else batch_indices(len(x_all), batch_size, step, seed + 11)
        k = int(torch.randint(0, 8, (1,), generator=g))
        x = _jitter(dihedral(x_all[idx], k), g)
        loss = F.cross_entropy(model(x.to(device)), y_all[idx].to(device))
        optimiser_step(loss, model.parameters(), opt, sched, clip=None)
        if progress:
            progress(step + 1, steps, loss.item())
    return model.eval()


def _batched(model: torch.nn.Module, images: np.ndarray, batch_size: int, name: str):
    """Yield model inputs (B, C, H, W) on the model's device, checked against its input channels."""
    _check_images(name, images)
    in_channels = (model.conv1 if isinstance(model, ResNet) else model.features.conv0).in_channels
    if images.shape[-1] != in_channels:
        raise ValueError(f"{name} expects images with {in_channels} channels, but got {images.shape[-1]}")
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        yield to_unit_range(images[i : i + batch_size]).to(device)


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Softmax class probabilities (N, n_classes) float32 for (N, H, W, C) uint8 images."""
    out = [model(x).float().softmax(1).cpu() for x in _batched(model, images, batch_size, "predict_proba")]
    return torch.cat(out).numpy() if out else np.zeros((0, _head(model).out_features), np.float32)


@torch.no_grad()
def features(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Penultimate-layer features (N, D) float32: the pooled input of the final linear layer."""
    captured = []
    hook = _head(model).register_forward_pre_hook(lambda module, args: captured.append(args[0].float().cpu()))
    try:
        for x in _batched(model, images, batch_size, "features"):
            model(x)
    finally:
        hook.remove()
    return torch.cat(captured).numpy() if captured else np.zeros((0, feature_dim(model)), np.float32)


def intended_class_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Probability each image gives its intended class: probs[i, labels[i]], shape (N,)."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"intended_class_confidence expects (N, n_classes) probabilities, but got shape {probs.shape}")
    _check_labels("intended_class_confidence", labels, len(probs), probs.shape[1])
    return probs[np.arange(len(probs)), np.asarray(labels)]

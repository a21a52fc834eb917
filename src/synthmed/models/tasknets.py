"""Task networks (MONAI): the segmenter and classifier that judge synthetic data, feature extractors and
downstream models; their inference and their weight I/O (safetensors). Training lives in training/tasks.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, ResNet, UNet

ARCHS = ("resnet", "densenet", "vae-encoder:<backbone>")
RESNET_WIDTHS = (32, 64, 128, 256)  # half of ResNet-18's (64, ..., 512): ~2.8M parameters, features D = 256
DENSENET_MIN_SIZE = 32  # DenseNet121 downsamples by 32; smaller inputs would pool to 0 x 0
LARGE_INPUT = 128  # px: from this size the ResNet's stem strides 2, as ResNet-18's does (activations 4x smaller)
INFER_PIXELS = 64 * 128 * 128  # pixels per inference batch: the batch sizes asked for up to 128 px, fewer above


def infer_batch(batch_size: int, height: int, width: int, pixels: int = INFER_PIXELS) -> int:
    """Images per inference call: `batch_size`, fewer for large images (at most `pixels` pixels, at least 1).
    Each image's output does not depend on its batch (eval mode), so this bounds memory, not results."""
    return max(1, min(batch_size, pixels // max(1, height * width)))


def stem_stride(image_size: int | None) -> int:
    """The ResNet classifier's stem stride for images of this size (None: small)."""
    return 2 if image_size is not None and image_size >= LARGE_INPUT else 1


def stem_key(image_size: int | None) -> dict:
    """What a cached classifier's key adds for its architecture at this size ({} for small images, whose
    caches predate the strided stem)."""
    return {"stem_stride": 2} if stem_stride(image_size) == 2 else {}


def to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 (an array, or a DiskArray: read whole) -> (N, C, H, W) float in [0, 1] (ControlNet conditioning range)."""
    return torch.from_numpy(np.asarray(images_uint8)).permute(0, 3, 1, 2).float().div(255.0)


def build_segmenter(n_classes: int, in_channels: int = 3) -> UNet:
    """A 2D residual U-Net with n_classes + 1 outputs (background first)."""
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=n_classes + 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)


@torch.no_grad()
def predict(model: UNet, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class-code maps (N, H, W) uint8 for (N, H, W, 3) uint8 images (converted a batch at a time: a split on disk is read by rows)."""
    device = next(model.parameters()).device
    batch_size = infer_batch(batch_size, *images.shape[1:3])
    out = [model(to_unit_range(images[i : i + batch_size]).to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.uint8) if out else np.zeros((0, *images.shape[1:3]), np.uint8)


def build_classifier(n_classes: int, in_channels: int = 3, arch: str = "resnet", image_size: int | None = None) -> ResNet | DenseNet121:
    """A 2D MONAI classifier with n_classes logits, for images of `image_size` px (the smaller side; None: small).

    "resnet": monai ResNet with ResNet-18's layout (basic blocks, [2, 2, 2, 2]) at RESNET_WIDTHS, and a
    3x3 stride-1 stem + max-pool (total stride 16) so 28 px images keep a 2 x 2 final map; from LARGE_INPUT
    (128 px) the stem strides 2 (total stride 32, ResNet-18's): a 512 px batch of 16 would otherwise hold
    16 x 32 x 512 x 512 floats per stem activation (0.5 GB each) in training.
    "densenet": the stock monai DenseNet121 (features D = 1024); inputs under 32 px are upsampled by a
    forward pre-hook, so any caller (also `model(x)` directly) can give it 28 px images.
    "vae-encoder:BACKBONE": EncoderClassifier on that backbone's VAE encoder (a preset with shipped weights,
    a diffusers folder, ...): a trunk that starts from the domain's images, for the low-data fractions.
    """
    if n_classes < 2:
        raise ValueError(f"build_classifier expects n_classes >= 2, but got {n_classes}")
    if in_channels < 1:
        raise ValueError(f"build_classifier expects in_channels >= 1, but got {in_channels}")
    if arch == "resnet":
        return ResNet("basic", [2, 2, 2, 2], list(RESNET_WIDTHS), spatial_dims=2, n_input_channels=in_channels, conv1_t_size=3,
                      conv1_t_stride=stem_stride(image_size), num_classes=n_classes)
    if arch == "densenet":
        model = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=n_classes)
        model.register_forward_pre_hook(_upsample_small_inputs)
        return model
    if arch.startswith("vae-encoder:") and arch.split(":", 1)[1]:
        from synthmed.models.backbone import load_backbone

        return EncoderClassifier(load_backbone(arch.split(":", 1)[1]).vae.encoder, in_channels, n_classes)
    raise ValueError(f"build_classifier expects arch in {ARCHS}, but got {arch!r}")


class EncoderClassifier(torch.nn.Module):
    """A classifier whose trunk is a pretrained, frozen Stable Diffusion VAE encoder (trained without labels on
    images of the domain: the shipped tiny backbones on unlabelled phantom patients, SD's on LAION), with a
    small trained head: two 3x3 convolutions on the encoder's last feature map (before its latent projection),
    global average and global max pooling side by side, and a linear layer. Grey inputs enter the encoder as
    R = G = B, as in training.

    The max is there for findings that cover a few cells of the map (a breast lesion at 64 px covers about 3 x 3 of
    the 16 x 16): the average dilutes them in the tissue around, the max says whether one is there anywhere. On
    the breast classification study at 10% real (100 images, real+classic) it took the test AUC from 0.63
    (average alone, 5 seeds) to about 0.9."""

    def __init__(self, encoder: torch.nn.Module, in_channels: int, n_classes: int, width: int = 64):
        super().__init__()
        self.in_channels = in_channels
        self.encoder = encoder.requires_grad_(False).eval()
        ch = encoder.conv_out.in_channels
        groups = 8 if width % 8 == 0 else 1
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(ch, width, 3, padding=1), torch.nn.GroupNorm(groups, width), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, stride=2, padding=1), torch.nn.GroupNorm(groups, width), torch.nn.SiLU())
        self.fc = torch.nn.Linear(2 * width, n_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, whatever the head does
        return self

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> the encoder's last feature map (B, ch, H / f, W / f)."""
        e = self.encoder
        x = x * 2 - 1
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.no_grad():
            h = e.conv_in(x)
            for block in e.down_blocks:
                h = block(h)
            h = e.mid_block(h)
            return e.conv_act(e.conv_norm_out(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.trunk(x))
        return self.fc(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))  # averaged and maxed over space


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
    return model.fc if isinstance(model, (ResNet, EncoderClassifier)) else model.class_layers.out


def feature_dim(model: torch.nn.Module) -> int:
    """D of `features`: 256 for "resnet", 1024 for "densenet"."""
    return _head(model).in_features


def _check_images(name: str, images: np.ndarray) -> None:
    if getattr(images, "ndim", None) != 4 or getattr(images, "dtype", None) != np.uint8:  # an array or a DiskArray
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


def _batched(model: torch.nn.Module, images: np.ndarray, batch_size: int, name: str):
    """Yield model inputs (B, C, H, W) on the model's device, checked against its input channels."""
    _check_images(name, images)
    in_channels = model.in_channels if isinstance(model, EncoderClassifier) else (model.conv1 if isinstance(model, ResNet) else model.features.conv0).in_channels
    if images.shape[-1] != in_channels:
        raise ValueError(f"{name} expects images with {in_channels} channels, but got {images.shape[-1]}")
    device = next(model.parameters()).device
    batch_size = infer_batch(batch_size, *images.shape[1:3])
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


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """A task network's state dict as safetensors (contiguous CPU tensors)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


def load_weights(model: torch.nn.Module, path: Path, device: str = "cpu") -> torch.nn.Module:
    """A task network with the weights `save_weights` wrote, in eval mode on the device."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()

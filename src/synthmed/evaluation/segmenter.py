"""A MONAI U-Net segmenter trained on real data: the judge of anatomical plausibility."""

from __future__ import annotations

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from synthmed.training.common import batch_indices, dihedral, optimiser_step, step_generator, to_unit_range, warmup_cosine


def build_segmenter(n_classes: int, in_channels: int = 3) -> UNet:
    """A 2D residual U-Net with n_classes + 1 outputs (background first)."""
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=n_classes + 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-image brightness/contrast/colour jitter: stain variation the judge must tolerate."""
    b = x.shape[0]
    scale = 1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1)
    shift = 0.05 * (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1)
    return (x * scale + shift).clamp(0, 1)


def train_segmenter(images: np.ndarray, masks: np.ndarray, n_classes: int, steps: int, batch_size: int, lr: float, seed: int, progress=None, device: str = "cpu") -> UNet:
    """Train on (N, H, W, 3) uint8 images and (N, H, W) codes with Dice + cross-entropy."""
    torch.manual_seed(seed)
    model = build_segmenter(n_classes, images.shape[-1]).to(device)
    x_all = to_unit_range(images)  # (N, 3, H, W)
    y_all = torch.from_numpy(masks.astype(np.int64))[:, None]  # (N, 1, H, W)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, warmup_fraction=0.1, floor=0.02)
    model.train()
    for step in range(steps):
        g = step_generator(seed, step, stream=9)
        idx = batch_indices(len(x_all), batch_size, step, seed + 9)
        k = int(torch.randint(0, 8, (1,), generator=g))
        x, y = dihedral(x_all[idx], k), dihedral(y_all[idx], k)
        loss = loss_fn(model(_jitter(x, g).to(device)), y.to(device))
        optimiser_step(loss, model.parameters(), opt, sched, clip=None)
        if progress:
            progress(step + 1, steps, loss.item())
    return model.eval()


@torch.no_grad()
def predict(model: UNet, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class-code maps (N, H, W) uint8 for (N, H, W, 3) uint8 images."""
    x = to_unit_range(images)
    device = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.uint8)

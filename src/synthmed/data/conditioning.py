"""Conditioning builders: turn class masks into the images a ControlNet is conditioned on."""

from __future__ import annotations

import numpy as np

# Background black; one saturated, well-separated colour per class code 1..5 (PanNuke order).
DEFAULT_PALETTE = np.array(
    [
        [0, 0, 0],  # background
        [255, 0, 0],  # neoplastic
        [0, 255, 0],  # inflammatory
        [0, 0, 255],  # connective
        [255, 255, 0],  # dead
        [255, 0, 255],  # epithelial
        [0, 255, 255],
        [255, 128, 0],
        [128, 0, 255],
    ],
    dtype=np.uint8,
)


def colour_mask(class_mask: np.ndarray, palette: np.ndarray = DEFAULT_PALETTE) -> np.ndarray:
    """Colour-code a class mask (H, W) of codes 0..K into an RGB image (H, W, 3) uint8."""
    class_mask = np.asarray(class_mask)
    if class_mask.ndim != 2:
        raise ValueError(f"colour_mask expects a (H, W) class mask, but got shape {class_mask.shape}")
    if class_mask.size and int(class_mask.max()) >= len(palette):
        raise ValueError(f"colour_mask expects codes < {len(palette)}, but got {int(class_mask.max())}")
    return palette[class_mask]


def decode_colour_mask(rgb: np.ndarray, palette: np.ndarray = DEFAULT_PALETTE) -> np.ndarray:
    """Invert colour_mask by nearest palette colour: (H, W, 3) -> (H, W) codes."""
    d = ((rgb[..., None, :].astype(np.int32) - palette[None, None].astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1).astype(np.uint8)

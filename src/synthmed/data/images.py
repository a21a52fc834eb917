"""Image files -> the uint8 pixels synthmed trains on: one set of stated rules for every reader.

- Palette images become the colours of their palette; CMYK, YCbCr, LAB and HSV become RGB; 1-bit becomes 0/255.
- An alpha channel is dropped when it is fully opaque; an image with any transparent pixel is refused,
  because the background it was meant to be composited on is not in the file.
- Values deeper than 8 bits (16-bit PNG or TIFF, 32-bit integer or float) are mapped to 0..255 by the
  0.5..99.5 percentile window of the image (`to_uint8`); DICOMs use their own VOI window (readers/files.py).
The result is (H, W) for greyscale and (H, W, 3) for colour. Masks are not images: their values are
class codes and are read raw (palette indices included) by the mask readers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.core.io import SynthmedError, load_png

RULES = ("palette -> its colours; opaque alpha dropped, transparent images refused; "
         "deeper than 8 bits -> 0..255 by the 0.5..99.5 percentile window of the image")
_TO_RGB = ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def to_uint8(volume: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5, where: np.ndarray | None = None) -> np.ndarray:
    """Percentile window to 0..255 (per volume for MRI: `where` = the body/brain voxels)."""
    vals = volume[where] if where is not None and where.any() else volume
    lo, hi = np.percentile(vals, [lo_pct, hi_pct]) if vals.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((volume.astype(np.float64) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def pil_pixels(im: Image.Image, path: Path) -> np.ndarray:
    """An opened PIL image -> uint8 (H, W) or (H, W, 3) by the rules above."""
    if im.mode in _TO_RGB:
        im = im.convert("RGBA" if im.mode in ("PA",) or "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    arr = np.array(im)
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        if int(arr[..., -1].min()) < 255:
            raise SynthmedError(f"{path}: image has transparent pixels (alpha below 255); flatten it onto its background first")
        arr = arr[..., :-1] if arr.shape[-1] == 4 else arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3):
        raise SynthmedError(f"{path}: {arr.shape[-1]}-channel image; expected greyscale or RGB")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise SynthmedError(f"{path}: image holds NaN or infinite values")
        arr = to_uint8(arr.astype(np.float64))
    return np.ascontiguousarray(arr)


def read_image(path: Path) -> np.ndarray:
    """An image file (anything PIL reads) -> uint8 (H, W) or (H, W, 3), one line naming the file if unreadable."""
    return load_png(path, lambda im: pil_pixels(im, Path(path)))

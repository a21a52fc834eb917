"""BUSI fixtures: `Dataset_BUSI_with_GT/{benign,malignant,normal}/<class> (N).png` + `_mask[_k].png`.

Images are greyscale saved as RGB PNG at real BUSI sizes (around 500 x 600, varying);
masks are 0/255 PNGs (mostly mode L, one RGB), some images with a second mask file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.data.readers.busi import CLASSES, FOLDER, prompt_of

SIZES = ((449, 562), (500, 500), (471, 600), (520, 580), (460, 510))


def _smooth(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """A smooth random field in [0, 1] (low-resolution noise, bicubic upsampled)."""
    low = (rng.random((max(2, h // cell), max(2, w // cell))) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float64) / 255.0


def _lesion(rng: np.random.Generator, h: int, w: int, irregular: bool) -> np.ndarray:
    """A boolean lesion: an ellipse, with a wobbly border when malignant."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.08, 0.16) * h, rng.uniform(0.1, 0.2) * w
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + (0.25 * np.sin(5 * angle + rng.uniform(0, 6)) if irregular else 0)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble**2


def _image(rng: np.random.Generator, h: int, w: int, lesion: np.ndarray) -> np.ndarray:
    """Layered echogenic tissue, a dark (hypoechoic) lesion with posterior shadowing."""
    depth = np.linspace(0, 1, h)[:, None]
    bands = 0.5 + 0.5 * np.sin(depth * 18 + 3 * _smooth(rng, h, w, 64))
    tissue = 40 + 90 * bands * (1.1 - 0.6 * depth) + 50 * _smooth(rng, h, w, 12)
    soft = np.asarray(Image.fromarray(lesion.astype(np.uint8) * 255).resize((w // 4, h // 4)).resize((w, h), Image.BICUBIC)) / 255.0
    shadow = np.cumsum(soft, axis=0) / (0.3 * h)
    img = tissue * (1 - 0.8 * soft) * (1 - 0.3 * np.clip(shadow, 0, 1)) + 20 * soft
    img[: h // 12] *= 0.3  # the dark near field under the probe
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def write(root: Path, *, seed: int = 0, scale: str = "small") -> list[dict]:
    """Write `ROOT/Dataset_BUSI_with_GT/...` like the download; return the expected samples.

    small: 4 images per class (12); real: 12 per class (36). Image 2 of benign and image 1
    of malignant have two lesions in two mask files (`_mask.png`, `_mask_1.png`).
    """
    per_class = 4 if scale == "small" else 12
    rng = np.random.default_rng(seed)
    expected = []
    for label in CLASSES:
        folder = Path(root) / FOLDER / label
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            h, w = SIZES[(n + CLASSES.index(label)) % len(SIZES)]
            n_lesions = 0 if label == "normal" else 2 if (label, n) in (("benign", 2), ("malignant", 1)) else 1
            lesions = [_lesion(rng, h, w, label == "malignant") for _ in range(n_lesions)]
            union = np.zeros((h, w), bool)
            for les in lesions:
                union |= les
            grey = _image(rng, h, w, union)
            stem = f"{label} ({n})"
            Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(folder / f"{stem}.png")
            for k, les in enumerate(lesions or [union]):
                m = les.astype(np.uint8) * 255
                if (label, n) == ("benign", 3):
                    m = np.repeat(m[..., None], 3, -1)  # a mask saved as RGB
                Image.fromarray(m).save(folder / (f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"))
            sid = f"{label}_{n:04d}"
            expected.append({"id": sid, "patient_id": sid, "split": None, "label": label, "image": grey,
                             "mask": union.astype(np.uint8), "prompt": prompt_of(label), "path": str(folder / f"{stem}.png")})
    return expected

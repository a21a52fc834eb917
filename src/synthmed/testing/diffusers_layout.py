"""`diffusers` fixtures in the fill50k style: a filled circle (image), its outline (conditioning), a caption.

    ROOT/metadata.jsonl + ROOT/images/ + ROOT/conditioning_images/              (split_folders=False)
    ROOT/{train,validation,test}/metadata.jsonl + images/ + conditioning_images/  (split_folders=True)

`image_key` picks the image column: "file_name" (HF image folder) or "image" (fill50k).
`scale="small"`: 64 px, 12 rows; `scale="real"`: 512 px (fill50k's size), 36 rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "light sea green": (32, 178, 170), "gold": (255, 215, 0), "navy": (0, 0, 128),
           "old lace": (253, 245, 230), "slate grey": (112, 128, 144)}
_SPLITS = ("train", "train", "train", "train", "validation", "test")


def circle(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(image (S, S, 3), outline conditioning (S, S, 3), caption)."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), 2, replace=False)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.12, 0.25)]
    d = np.sqrt((yy - cy * size) ** 2 + (xx - cx * size) ** 2) / size
    image = np.where((d < r)[..., None], COLOURS[names[fg]], COLOURS[names[bg]]).astype(np.uint8)
    cond = np.repeat((np.abs(d - r) < 1.5 / size)[..., None] * np.uint8(255), 3, -1)
    return image, cond, f"{names[fg]} circle with {names[bg]} background"


def write(root: Path, *, seed: int = 0, scale: str = "small", split_folders: bool = False, image_key: str = "file_name") -> list[dict]:
    """Write images, conditioning images and metadata.jsonl file(s); return the expected samples (+ "conditioning")."""
    rng = np.random.default_rng(seed)
    size, n = (512, 36) if scale == "real" else (64, 12)
    root = Path(root)
    rows: dict[str | None, list[dict]] = {}
    expected = []
    for i in range(n):
        split = _SPLITS[i % len(_SPLITS)] if split_folders else None
        folder = root / split if split else root
        for sub in ("images", "conditioning_images"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        image, cond, text = circle(rng, size)
        name = f"{i:05d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        Image.fromarray(cond).save(folder / "conditioning_images" / name)
        rows.setdefault(split, []).append({image_key: f"images/{name}", "conditioning_image": f"conditioning_images/{name}", "text": text})
        sid = f"{split}_images_{i:05d}" if split else f"images_{i:05d}"
        expected.append({"id": sid, "patient_id": sid, "split": split, "label": None, "image": image, "mask": None,
                         "prompt": text, "conditioning": cond})
    for split, split_rows in rows.items():
        with open((root / split if split else root) / "metadata.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in split_rows)
    return expected

"""BCI fixtures: `BCI_dataset/{HE,IHC}/{train,test}/NNNNN_{split}_{level}.png` pairs, as downloaded.

Pairs are smooth 1024 x 1024 RGB images (the real size) sharing one tissue layout: pink and
purple H&E, and an IHC with brown DAB membrane staining that deepens with the HER2 level.
"small": 4 train pairs (levels 0, 1+, 2+, 3+) and 2 test pairs; "real": 24 + 8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.data.readers.bci import LEVELS

SIZE = 1024


def _field(rng: np.random.Generator, size: int, cells: int = 16) -> np.ndarray:
    """A smooth random field in [0, 1] (bicubic upsampling of a coarse grid)."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    f = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    return (f - f.min()) / max(float(f.max() - f.min()), 1e-6)


def pair(rng: np.random.Generator, level: str, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One (HE, IHC) pair of (size, size, 3) uint8 images with the same layout."""
    tissue, nuclei = _field(rng, size), _field(rng, size, 48)
    he = np.stack([235 - 50 * tissue - 60 * nuclei, 190 - 90 * tissue - 60 * nuclei, 215 - 30 * tissue - 20 * nuclei], -1)
    dab = tissue * (0.15 + 0.25 * LEVELS.index(level))  # brown membrane stain, stronger for higher HER2
    ihc = np.stack([230 - 90 * dab - 40 * nuclei, 225 - 150 * dab - 40 * nuclei, 230 - 200 * dab - 10 * nuclei], -1)
    return np.clip(he, 0, 255).astype(np.uint8), np.clip(ihc, 0, 255).astype(np.uint8)


def write(root: Path, *, seed: int = 0, scale: str = "small", wrap: bool = True) -> list[dict]:
    """Write the pairs under ROOT/BCI_dataset (or ROOT itself with wrap=False); return the expected samples."""
    base = Path(root) / "BCI_dataset" if wrap else Path(root)
    rng = np.random.default_rng(seed)
    per_split = {"train": 4, "test": 2} if scale == "small" else {"train": 24, "test": 8}
    expected = []
    for split, n in per_split.items():
        for stain in ("HE", "IHC"):
            (base / stain / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            level = LEVELS[i % len(LEVELS)]
            name = f"{i:05d}_{split}_{level}"
            he, ihc = pair(rng, level)
            Image.fromarray(he).save(base / "HE" / split / f"{name}.png", compress_level=1)
            Image.fromarray(ihc).save(base / "IHC" / split / f"{name}.png", compress_level=1)
            expected.append({"id": name, "patient_id": name, "split": split, "label": level, "image": ihc, "paired": he,
                             "mask": None, "prompt": f"ihc her2 staining, her2 score {level}"})
    return expected

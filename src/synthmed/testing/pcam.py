"""PatchCamelyon fixtures: `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5` + `_meta.csv`, as downloaded.

Patches are phantom-histology tiles cut to the real 96 x 96 (x: (N, 96, 96, 3) uint8,
y: (N, 1, 1, 1) uint8); the meta CSV has pandas' unnamed index column, like the original.
"small": 12 / 4 / 4 patches from 4 / 2 / 2 slides; "real": 48 / 16 / 16 from 8 / 4 / 4.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from synthmed.data.phantoms.histology import render_tile, slide_of
from synthmed.data.readers.pcam import FINDINGS, LABELS, SPLITS

SIZE = 96


def _patch(seed: int, index: int, tumour: bool) -> np.ndarray:
    """A 96 x 96 H&E-like patch; tumour patches are darker and more purple (denser nuclei)."""
    tile = render_tile(seed, index, 128, slide_of(seed, index // 3)).image[16:112, 16:112].astype(np.float64)
    if tumour:
        tile = tile * np.array([0.8, 0.7, 0.9])
    return np.clip(tile, 0, 255).astype(np.uint8)


def write(root: Path, *, seed: int = 0, scale: str = "small", meta: bool = True, splits=("train", "valid", "test")) -> list[dict]:
    """Write the h5 files (and meta CSVs) in the official layout; return the expected samples."""
    import h5py

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": (12, 4), "valid": (4, 2), "test": (4, 2)} if scale == "small" else {"train": (48, 8), "valid": (16, 4), "test": (16, 4)}
    rng = np.random.default_rng(seed)
    expected = []
    for k, split in enumerate(splits):
        n, n_slides = counts[split]
        slide = [i * n_slides // n for i in range(n)]  # odd slides are tumour slides, the others normal
        wsi = [f"camelyon16_{split}_{'tumor' if s % 2 else 'normal'}_{s:03d}" for s in slide]
        y = np.array([i % 3 != 0 if s % 2 else 0 for i, s in enumerate(slide)], np.uint8)
        x = np.stack([_patch(seed, k * 10_000 + i, bool(y[i])) for i in range(n)])
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as fh:
            fh.create_dataset("x", data=x)
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as fh:
            fh.create_dataset("y", data=y.reshape(n, 1, 1, 1))
        if meta:
            with open(root / f"camelyonpatch_level_2_split_{split}_meta.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
                for i in range(n):
                    w.writerow([i, int(rng.integers(0, 90_000)), int(rng.integers(0, 90_000)), bool(y[i]), bool(y[i]), wsi[i]])
        for i in range(n):
            sid = f"{SPLITS[split]}_{i:06d}"
            label = LABELS[y[i]]
            expected.append({"id": sid, "patient_id": wsi[i] if meta else sid, "split": SPLITS[split], "label": label,
                             "image": x[i], "mask": None, "prompt": f"h&e lymph node patch, {FINDINGS[label]}"})
    return expected

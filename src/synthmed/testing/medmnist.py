"""MedMNIST fixtures: `{flag}.npz` / `{flag}_{size}.npz` with the official keys, dtypes and shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthmed.data.readers.medmnist import FLAGS, MULTI_LABEL

RGB_FLAGS = {"pathmnist", "dermamnist", "bloodmnist", "retinamnist"}


def _image(rng: np.random.Generator, size: int, rgb: bool, label: int) -> np.ndarray:
    """A smooth blob image whose brightness depends on the label (so classes differ)."""
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    base = 40 + 20 * label + 150 * blob
    img = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
    return np.stack([img, np.roll(img, 3, 0), 255 - img], -1) if rgb else img


def write(root: Path, *, seed: int = 0, scale: str = "small", flag: str = "pathmnist", size: int = 28,
          counts: tuple[int, int, int] = (12, 4, 4), compressed: bool = True) -> list[dict]:
    """Write `{flag}[_{size}].npz` like the official file; return the expected samples."""
    if scale == "real":
        counts = (2000, 300, 300)
        size = 224 if size == 28 else size
    rng = np.random.default_rng(seed)
    names = FLAGS[flag][1]
    arrays, expected = {}, []
    for (key, split), n in zip((("train", "train"), ("val", "validation"), ("test", "test")), counts):
        if flag in MULTI_LABEL:
            labels = (rng.random((n, len(names))) < 0.15).astype(np.uint8)
            codes = [int(np.flatnonzero(l)[0]) if l.any() else 0 for l in labels]
        else:
            labels = rng.integers(0, len(names), (n, 1)).astype(np.uint8)
            codes = labels[:, 0].tolist()
        images = np.stack([_image(rng, size, flag in RGB_FLAGS, c) for c in codes])
        arrays[f"{key}_images"], arrays[f"{key}_labels"] = images, labels
        for i in range(n):
            label = "|".join(names[j] for j in np.flatnonzero(labels[i])) if flag in MULTI_LABEL else names[labels[i, 0]]
            label = label or "no finding"
            expected.append({"id": f"{flag}_{key}_{i:06d}", "patient_id": f"{flag}_{key}_{i:06d}", "split": split, "label": label,
                             "image": images[i], "mask": None, "prompt": f"{FLAGS[flag][0]}, {label.replace('|', ', ')}"})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return expected

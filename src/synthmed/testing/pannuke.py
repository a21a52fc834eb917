"""PanNuke fixtures: `Fold N/images/foldN/{images,types}.npy` + `Fold N/masks/foldN/masks.npy`, as downloaded.

Patches are phantom-histology tiles at the real 256 x 256, stored float64 like the source
(masks: 6 channels of instance ids, channel 5 = background). "small" writes 4 patches per
fold, "real" 16 (the real folds hold about 2,600); `n_per_fold` overrides both. The big
arrays are written row by row after the .npy header, never built whole in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from synthmed.data.phantoms.histology import render_tile, slide_of
from synthmed.data.readers.pannuke import CLASSES, TISSUES, make_prompt

SIZE = 256


@contextmanager
def npy_row_writer(path: Path, shape: tuple, dtype=np.float64):
    """Write a .npy header for `shape`, then yield a function appending one row at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        yield lambda row: fh.write(np.ascontiguousarray(row, dtype).tobytes())


def fold_paths(root: Path, fold: int) -> tuple[Path, Path, Path]:
    """images.npy, types.npy, masks.npy of one fold, in the official folder names."""
    base = Path(root) / f"Fold {fold}"
    return (base / "images" / f"fold{fold}" / "images.npy", base / "images" / f"fold{fold}" / "types.npy",
            base / "masks" / f"fold{fold}" / "masks.npy")


def _patch(rng: np.random.Generator, seed: int, index: int, empty: bool):
    """One tile as PanNuke arrays: image (H, W, 3) and masks (H, W, 6), with shuffled source ids."""
    tile = render_tile(seed, index, SIZE, slide_of(seed, index // 2))
    cls = np.zeros_like(tile.class_mask) if empty else tile.class_mask
    new_id = np.concatenate([[0], rng.permutation(np.arange(1, 5000))[: int(tile.instance_mask.max())]])
    ids = np.where(cls > 0, new_id[tile.instance_mask], 0)
    masks = np.zeros((SIZE, SIZE, 6))
    for c in range(5):
        masks[..., c] = np.where(cls == c + 1, ids, 0)
    masks[..., 5] = cls == 0
    # Expected instances: visible (class, source id) pairs numbered 1..n in that order.
    key = cls.astype(np.int64) * 10_000 + ids
    order = np.unique(key[key > 0])
    instances = np.where(key > 0, np.searchsorted(order, key) + 1, 0).astype(np.uint16)
    return tile.image, masks, cls.astype(np.uint8), instances


def write(root: Path, *, seed: int = 0, scale: str = "small", n_per_fold: int | None = None, folds=(1, 2, 3)) -> list[dict]:
    """Write the folds in the official layout; return the expected samples (fold1 train, 2 validation, 3 test)."""
    n = n_per_fold or (4 if scale == "small" else 16)
    rng = np.random.default_rng(seed)
    splits = {1: "train", 2: "validation", 3: "test"}
    expected = []
    for fold in folds:
        images_path, types_path, masks_path = fold_paths(root, fold)
        tissues = [TISSUES[int(t)] for t in rng.integers(0, len(TISSUES), n)]
        with npy_row_writer(images_path, (n, SIZE, SIZE, 3)) as add_image, npy_row_writer(masks_path, (n, SIZE, SIZE, 6)) as add_mask:
            for i in range(n):
                empty = fold == folds[-1] and i == n - 1  # one patch without nuclei
                image, masks, cls, instances = _patch(rng, seed, fold * 100_000 + i, empty)
                add_image(image.astype(np.float64))
                add_mask(masks)
                classes = [CLASSES[c - 1] for c in np.unique(cls) if c > 0]
                sid = f"fold{fold}_{i:05d}"
                expected.append({"id": sid, "patient_id": sid, "split": splits.get(fold), "label": tissues[i], "image": image,
                                 "mask": cls, "instances": instances, "prompt": make_prompt(tissues[i], classes)})
        np.save(types_path, np.array(tissues))
    return expected

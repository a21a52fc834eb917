"""A tiny ACDC download: training/ and testing/ patient folders with Info.cfg and NIfTI frames.

`scale="small"`: 7 training patients (every group) + 2 testing patients, in-plane sizes that
vary by patient (144..208 px, anisotropic voxels) but only 4-6 slices and 5 cine frames each.
`scale="real"`: 216 x 256 style frames with 10 slices and 30 cine frames, 5 patients.
Images are a body ellipse with the RV, myocardium and LV as concentric ellipses (int16, one
patient float32), _gt uint8. Expected samples are for the reader's default options.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthmed.data.readers.acdc import GROUPS, PHASES, WINDOW
from synthmed.data.images import to_uint8

# (subset, patient number, group, X, Y, Z) for the small fixture
SMALL = [
    ("training", 1, "DCM", 154, 176, 5), ("training", 2, "DCM", 176, 208, 4), ("training", 21, "HCM", 160, 160, 6),
    ("training", 41, "MINF", 168, 192, 5), ("training", 61, "NOR", 144, 176, 4), ("training", 81, "RV", 176, 176, 5),
    ("training", 82, "RV", 192, 160, 4), ("testing", 101, "DCM", 160, 176, 5), ("testing", 121, "HCM", 176, 144, 4),
]
REAL = [("training", 1, "DCM", 216, 256, 10), ("training", 21, "HCM", 232, 256, 10), ("training", 41, "MINF", 256, 216, 9),
        ("training", 61, "NOR", 216, 256, 10), ("testing", 101, "DCM", 224, 256, 10)]
# group -> (LV radius, myocardium thickness, RV size) in mm at end-diastole
SHAPE = {"DCM": (32, 6, 1.0), "HCM": (18, 16, 1.0), "MINF": (28, 7, 1.0), "NOR": (24, 9, 1.0), "RV": (22, 9, 1.6)}


def _slice(xs, ys, cx, cy, lv, myo, rv, contract):
    """One short-axis slice (Y, X): intensity image and label codes."""
    body = np.hypot((xs - cx * 0.95) / (cx * 0.85), (ys - cy) / (cy * 0.8)) < 1
    image = np.where(body, 300 + 40 * np.sin(xs / 9.0) * np.cos(ys / 13.0), 20.0)
    labels = np.zeros(xs.shape, np.uint8)
    if lv <= 0:  # beyond the apex
        return image, labels
    lv_r = lv * contract
    d = np.hypot(xs - cx, ys - cy)
    rv_d = np.hypot((xs - (cx - lv_r - myo - 10 * rv)) / (14 * rv * contract), (ys - cy) / (lv_r + myo + 4))
    labels[(rv_d < 1) & (d >= lv_r + myo)] = 1
    labels[(d >= lv_r) & (d < lv_r + myo)] = 2
    labels[d < lv_r] = 3
    labels[~body] = 0
    image = np.select([labels == 3, labels == 1, labels == 2], [720.0, 660.0, 160.0], image)
    return image, labels


def _frame(rng, nx, ny, nz, group, contract, spacing, dtype):
    """A 3D frame (X, Y, Z) and its _gt: the heart shrinks towards the apex (last slice empty)."""
    lv, myo, rv = SHAPE[group]
    ys, xs = np.mgrid[0:ny, 0:nx].astype(np.float64) * spacing
    cx, cy = nx * spacing * 0.55, ny * spacing * 0.5
    vol, gt = np.zeros((nx, ny, nz)), np.zeros((nx, ny, nz), np.uint8)
    for z in range(nz):
        scale = 1 - 0.6 * z / (nz - 2) if z < nz - 1 else 0.0  # base to apex; the last slice is beyond it
        img, lab = _slice(xs, ys, cx, cy, lv * scale, myo, rv * max(scale, 0.3), contract)
        vol[:, :, z], gt[:, :, z] = img.T, lab.T
    vol = np.clip(vol + rng.normal(0, 12, vol.shape), 0, None)  # MRI magnitudes are non-negative
    return vol.astype(dtype), gt


def _cine(ed: np.ndarray, es: np.ndarray, es_frame: int, n_frames: int) -> np.ndarray:
    """(X, Y, Z, T): ED at frame 1, ES at frame es_frame, cross-faded in between (cheap, not physics)."""
    t = np.arange(n_frames, dtype=np.float64)
    mix = np.where(t < es_frame - 1, (es_frame - 1 - t) / max(es_frame - 1, 1), (t - es_frame + 1) / max(n_frames - es_frame, 1))
    return np.stack([(m * ed + (1 - m) * es).astype(ed.dtype) for m in mix], -1)


def _save(path: Path, array: np.ndarray, spacing: tuple) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    img.header.set_data_dtype(array.dtype)
    nib.save(img, str(path))


def write(root: Path, *, seed: int = 0, scale: str = "small") -> list[dict]:
    """Write the source under root; returns the samples the reader must produce (default options)."""
    if scale not in ("small", "real"):
        raise ValueError(f"write expects scale 'small' or 'real', but got {scale!r}")
    rng = np.random.default_rng(seed)
    n_frames = 5 if scale == "small" else 30
    has_test = any(s == "testing" for s, *_ in (SMALL if scale == "small" else REAL))
    expected = []
    for i, (subset, num, group, nx, ny, nz) in enumerate(SMALL if scale == "small" else REAL):
        pid = f"patient{num:03d}"
        folder = Path(root) / subset / pid
        folder.mkdir(parents=True, exist_ok=True)
        spacing = (1.5625 + 0.1 * (i % 3), 1.5625 + 0.1 * (i % 3), 10.0 - i % 2 * 5)
        ed, es = 1, (2 if scale == "small" else 10) + i % 4
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: {160 + i}.0\nNbFrame: {n_frames}\nWeight: {60 + 2 * i}.0\n")
        dtype = np.float32 if i == 3 else np.int16
        ed_vol, ed_gt = _frame(rng, nx, ny, nz, group, 1.0, spacing[0], dtype)
        es_vol, es_gt = _frame(rng, nx, ny, nz, group, 0.7, spacing[0], dtype)  # end-systole: smallest cavities
        _save(folder / f"{pid}_4d.nii.gz", _cine(ed_vol, es_vol, es, n_frames), spacing)
        split = "test" if subset == "testing" else ("train" if has_test else None)
        for phase, frame, vol, gt in (("ED", ed, ed_vol, ed_gt), ("ES", es, es_vol, es_gt)):
            stem = folder / f"{pid}_frame{frame:02d}"
            _save(stem.with_name(stem.name + ".nii.gz"), vol, spacing)
            _save(stem.with_name(stem.name + "_gt.nii.gz"), gt, spacing)
            norm = to_uint8(vol, *WINDOW)
            for z in range(nz):
                expected.append({
                    "id": f"{pid}_{phase}_z{z:02d}", "patient_id": pid, "split": split, "label": group,
                    "image": np.ascontiguousarray(norm[:, :, z].T), "mask": np.ascontiguousarray(gt[:, :, z].T),
                    "prompt": f"cardiac cine mri, short-axis slice, {PHASES[phase]}, {GROUPS[group]}",
                    "phase": phase, "slice": z, "foreground": int((gt[:, :, z] > 0).sum()),
                    "image_path": str(stem.with_name(stem.name + ".nii.gz")), "gt_path": str(stem.with_name(stem.name + "_gt.nii.gz")),
                })
    return expected

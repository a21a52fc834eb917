"""A tiny BraTS download: case folders in the 2021 or the 2023+ (GLI) naming.

`scale="small"`: 6 cases (2021) or 7 cases of 6 patients (2023: BraTS-GLI-00000 has two
timepoints), each 240 x 240 in plane as in BraTS but only 10 slices deep. `scale="real"`:
240 x 240 x 155, 2 cases. Every volume holds a skull-stripped brain ellipsoid (0 outside)
with a tumour: oedema around an enhancing shell around a necrotic core (one case without
necrosis); images int16 (2021) or float32 (2023), seg uint8. Expected samples are for the
reader's default options (flair, tumour slices, class masks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthmed.data.readers.brats import NAMINGS, brain_uint8, patient_of

SMALL_2021 = ["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003", "BraTS2021_00005", "BraTS2021_00006", "BraTS2021_00008"]
SMALL_2023 = ["BraTS-GLI-00000-000", "BraTS-GLI-00000-001", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000",
              "BraTS-GLI-00005-000", "BraTS-GLI-00006-000", "BraTS-GLI-00008-000"]
# tissue -> intensity offset per modality (flair, t1, t1ce, t2); tissue codes 1 NCR, 2 ED, 3 ET
CONTRAST = {"flair": (0, 100, 400, 250), "t1": (0, -200, -80, -50), "t1ce": (0, -150, -50, 600), "t2": (0, 600, 500, 300)}
PROMPT = {1: "necrotic core", 2: "oedema", 3: "enhancing tumour"}


def _case(rng, i: int, depth: int):
    """(tissue codes 0..3, brain mask, texture), each (X, Y, Z): a brain ellipsoid with a tumour."""
    x, y, z = np.meshgrid(np.arange(240.0), np.arange(240.0), np.arange(depth), indexing="ij")
    zc, zr = depth * 0.58, depth * 0.6  # the first slice only grazes the top of the brain
    brain = ((x - 120) / 78) ** 2 + ((y - 118) / 96) ** 2 + ((z - zc) / zr) ** 2 < 1
    tx, ty, tz = 95 + 12 * (i % 4), 100 + 9 * (i % 3), depth * (0.4 + 0.05 * (i % 3))
    d = np.sqrt(((x - tx) / 30) ** 2 + ((y - ty) / 26) ** 2 + ((z - tz) / (depth * 0.25)) ** 2)
    tissue = np.zeros(x.shape, np.uint8)
    tissue[d < 1.0] = 2
    tissue[d < 0.6] = 3
    if i % 5 != 2:  # one case has no necrotic core
        tissue[d < 0.35] = 1
    tissue[~brain] = 0
    texture = 400 + 80 * np.sin(x / 7) * np.cos(y / 11) + 30 * np.cos(z / 3)
    return tissue, brain, texture


def _save(path: Path, array: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_data_dtype(array.dtype)
    nib.save(img, str(path))


def write(root: Path, *, seed: int = 0, scale: str = "small", naming: str = "2023") -> list[dict]:
    """Write the source under root; returns the samples the reader must produce (default options)."""
    if scale not in ("small", "real") or naming not in NAMINGS:
        raise ValueError(f"write expects scale small/real and naming 2021/2023, but got {scale!r}, {naming!r}")
    rng = np.random.default_rng(seed)
    names = SMALL_2021 if naming == "2021" else SMALL_2023
    names, depth = (names, 10) if scale == "small" else (names[:2], 155)
    _, sep, suffix, _ = NAMINGS[naming]
    dtype = np.int16 if naming == "2021" else np.float32
    expected = []
    for i, case in enumerate(names):
        folder = Path(root) / case
        folder.mkdir(parents=True, exist_ok=True)
        tissue, brain, texture = _case(rng, i, depth)
        flair = None
        for mod, offsets in CONTRAST.items():
            vol = texture + np.asarray(offsets, np.float64)[tissue] + rng.normal(0, 8, tissue.shape)
            vol = np.where(brain, np.clip(np.round(vol), 1, None), 0).astype(dtype)  # integer-valued, as scanners write
            _save(folder / f"{case}{sep}{suffix[mod]}.nii.gz", vol)
            flair = vol if mod == "flair" else flair
        seg = np.where(tissue == 3, 4 if naming == "2021" else 3, tissue).astype(np.uint8)
        _save(folder / f"{case}{sep}seg.nii.gz", seg)
        image = brain_uint8(flair)
        for z in range(depth):
            codes = tissue[:, :, z].T
            present = [c for c in (1, 2, 3) if (codes == c).any()]
            if not present:
                continue
            finding = "glioma with " + (", ".join(PROMPT[c] for c in present[:-1]) + " and " if len(present) > 1 else "") + PROMPT[present[-1]]
            expected.append({
                "id": f"{case}_z{z:03d}", "patient_id": patient_of(case), "split": None, "label": "tumour",
                "image": np.ascontiguousarray(image[:, :, z].T), "mask": np.ascontiguousarray(codes),
                "prompt": f"brain mri, flair, axial slice, {finding}", "case": case, "slice": z,
            })
    return expected

"""CBIS-DDSM fixtures: the four case-description CSVs and the DICOM tree as TCIA delivers it.

Full mammograms are 16-bit MONOCHROME2 DICOMs (one MONOCHROME1), ROI masks 8-bit 0/255 at
the full image's size, cropped images small 16-bit DICOMs; each ROI folder holds mask and
crop as 000000.dcm / 000001.dcm in varying order. One case uses the newer "descriptive"
folder names (`07-20-2016-DDSM-.../1.000000-full mammogram images-.../1-1.dcm`). The CSV
paths deliberately differ from the tree below their first folder, as in the real download.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

TOP = "CBIS-DDSM"
MASS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id", "abnormality type",
                "mass shape", "mass margins", "assessment", "pathology", "subtlety", "image file path",
                "cropped image file path", "ROI mask file path"]
CALC_COLUMNS = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id", "abnormality type",
                "calc type", "calc distribution", "assessment", "pathology", "subtlety", "image file path",
                "cropped image file path", "ROI mask file path"]
M, B, BWC = "MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"
# (kind, split, patient number, breast, view, pathologies of its abnormalities)
CASES = [
    ("mass", "train", 1, "LEFT", "CC", [M]), ("mass", "train", 1, "LEFT", "MLO", [M]),
    ("mass", "train", 4, "RIGHT", "CC", [B, BWC]), ("mass", "train", 5, "RIGHT", "MLO", [B]),
    ("calc", "train", 7, "LEFT", "CC", [M]), ("calc", "train", 8, "RIGHT", "MLO", [BWC]), ("calc", "train", 9, "LEFT", "MLO", [M]),
    ("mass", "test", 10, "LEFT", "CC", [M]), ("mass", "test", 11, "RIGHT", "MLO", [B]),
    ("calc", "test", 12, "LEFT", "MLO", [M, B]), ("calc", "test", 13, "RIGHT", "CC", [B]),
]
MONOCHROME1 = (5, "MLO")  # the (patient, view) stored inverted
DESCRIPTIVE = (7, "CC")  # the (patient, view) with the newer TCIA folder names


def _uid(rng: np.random.Generator) -> str:
    return "1.3.6.1.4.1.9590.100.1.2." + "".join(str(d) for d in rng.integers(0, 10, 39))


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", description: str = "") -> None:
    """A minimal single-frame DICOM (explicit VR little endian) holding `pixels` (uint8 or uint16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesDescription, ds.PatientID = "MG", description, path.parts[-4] if len(path.parts) > 4 else ""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _smooth(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    low = (rng.random((max(2, h // cell), max(2, w // cell))) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32) / 255.0


def _mammogram(rng: np.random.Generator, h: int, w: int, left: bool, kinds: list[str]):
    """(uint8 image, [lesion masks]): breast against the chest wall, lesions, a burned-in film label."""
    yy, xx = (np.arange(h, dtype=np.float32) / h)[:, None], (np.arange(w, dtype=np.float32) / w)[None, :]
    dx = xx if left else 1 - xx  # distance from the chest wall
    breast = (dx / 0.75) ** 2 + ((yy - 0.5) / 0.45) ** 2 <= 1
    tissue = (70 + 90 * _smooth(rng, h, w, max(4, h // 30)) * (1 - 0.5 * dx) + 30 * _smooth(rng, h, w, max(2, h // 100)))
    img = np.where(breast, tissue, np.float32(0))
    lesions = []
    for kind in kinds:
        cy, cd = rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.45)
        cx = cd if left else 1 - cd
        r = rng.uniform(0.04, 0.07)
        blob = ((yy - cy) * h) ** 2 + ((xx - cx) * w) ** 2 <= (r * h) ** 2
        if kind == "mass":
            img = np.where(blob, img + 45, img)
        else:  # a cluster of bright specks inside the outlined region
            specks = blob & (_smooth(rng, h, w, max(2, h // 60)) > 0.75)
            img = np.where(specks, 235, img)
        lesions.append(blob)
    img = np.clip(img, 0, 240)
    ly, lx = h // 10, w // 8  # the film label: the only saturated pixels (about 1.25 % of the image)
    img[h // 40 : h // 40 + ly, (w - w // 40 - lx if left else w // 40) :][:, :lx] = 255
    return img.astype(np.uint8), lesions


def _store(img8: np.ndarray, photometric: str, offset: int) -> np.ndarray:
    """uint8 -> uint16 film scan, linear, so that the reader's window recovers img8 exactly."""
    src = 255 - img8.astype(np.uint32) if photometric == "MONOCHROME1" else img8.astype(np.uint32)
    return (offset + 200 * src).astype(np.uint16)


def _cases(scale: str) -> list[tuple]:
    if scale == "small":
        return CASES
    return CASES + [(k, s, p + 100, b, v, ps) for k, s, p, b, v, ps in CASES]  # 22 mammograms, 20 patients


def write(root: Path, *, seed: int = 0, scale: str = "small") -> list[dict]:
    """Write the CSVs at ROOT and DICOMs under ROOT/CBIS-DDSM/; return one expected sample per mammogram.

    small: 11 mammograms of about 300 x 200 (10 patients; mass and calc; train and test);
    real: 22 of about 3000 x 2000 (about 0.4 GB).
    """
    root, rng = Path(root), np.random.default_rng(seed)
    rows: dict[tuple[str, str], list[dict]] = {}
    expected = []
    for n, (kind, split, pnum, breast, view, paths) in enumerate(_cases(scale)):
        h, w = ((300, 200) if scale == "small" else (3000, 2000))
        h, w = h + 10 * (n % 3) * (h // 300), w + 4 * (n % 2) * (w // 200)
        patient = f"P_{pnum:05d}"
        folder = f"{kind.capitalize()}-{'Training' if split == 'train' else 'Test'}_{patient}_{breast}_{view}"
        photometric = "MONOCHROME1" if (pnum % 100, view) == MONOCHROME1 else "MONOCHROME2"
        descriptive = (pnum % 100, view) == DESCRIPTIVE
        img8, lesions = _mammogram(rng, h, w, breast == "LEFT", [kind] * len(paths))
        stored = _store(img8, photometric, 100 + n)
        full = (f"07-20-2016-DDSM-{n:05d}/1.000000-full mammogram images-{n:05d}/1-1.dcm" if descriptive
                else f"{_uid(rng)}/{_uid(rng)}/000000.dcm")
        write_dicom(root / TOP / folder / full, stored, photometric, "full mammogram images")
        union, lesion_masks = np.zeros((h, w), np.uint8), []
        for a, (pathology, blob) in enumerate(zip(paths, lesions), 1):
            roi_folder, mask8 = f"{folder}_{a}", blob.astype(np.uint8) * 255
            ys, xs = np.nonzero(blob)
            crop = stored[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            if descriptive:
                sub = f"07-21-2016-DDSM-{n:05d}"
                mask_file, crop_file = f"{sub}/1.000000-ROI mask images-{n:05d}/1-1.dcm", f"{sub}/1.000000-cropped images-{n:05d}/1-1.dcm"
            else:
                series = f"{_uid(rng)}/{_uid(rng)}"
                names = ("000000.dcm", "000001.dcm") if (n + a) % 2 else ("000001.dcm", "000000.dcm")
                mask_file, crop_file = f"{series}/{names[0]}", f"{series}/{names[1]}"
            write_dicom(root / TOP / roi_folder / mask_file, mask8, description="ROI mask images")
            write_dicom(root / TOP / roi_folder / crop_file, crop, photometric, "cropped images")
            union |= blob.astype(np.uint8)
            lesion_masks.append((pathology, blob.astype(np.uint8)))
            csv_roi = f"{roi_folder}/{_uid(rng)}/{_uid(rng)}/00000{a % 2}.dcm" + ("\n" if kind == "calc" else "")
            rows.setdefault((kind, split), []).append(_row(kind, patient, breast, view, a, pathology, n, folder, rng, csv_roi))
        label = "malignant" if M in paths else "benign"
        abnormality = "mass" if kind == "mass" else "calcification"
        expected.append({"id": folder, "patient_id": patient, "split": split, "label": label, "image": img8, "mask": union,
                         "prompt": f"mammogram, {view.lower()} view, {label} {abnormality}", "kind": kind,
                         "view": view.lower(), "laterality": breast.lower(), "photometric": photometric,
                         "lesions": lesion_masks, "path": str(root / TOP / folder / full)})
    for (kind, split), kind_rows in rows.items():
        _write_csv(root / f"{kind}_case_description_{split}_set.csv", MASS_COLUMNS if kind == "mass" else CALC_COLUMNS, kind_rows)
    return expected


def _row(kind: str, patient: str, breast: str, view: str, a: int, pathology: str, n: int, folder: str, rng, roi: str) -> dict:
    """One CSV row (one abnormality), with paths that match the tree only in their first folder."""
    density = 1 + n % 4
    row = {"patient_id": patient, "left or right breast": breast, "image view": view, "abnormality id": a,
           "abnormality type": "mass" if kind == "mass" else "calcification", "assessment": 4 if pathology == M else 3,
           "pathology": pathology, "subtlety": 1 + (n + a) % 5,
           "image file path": f"{folder}/{_uid(rng)}/{_uid(rng)}/000000.dcm",
           "cropped image file path": f"{folder}_{a}/{_uid(rng)}/{_uid(rng)}/00000{(a + 1) % 2}.dcm" + ("\n" if kind == "calc" else ""),
           "ROI mask file path": roi}
    if kind == "mass":
        row.update({"breast_density": density, "mass shape": "IRREGULAR" if pathology == M else "OVAL",
                    "mass margins": "SPICULATED" if pathology == M else "CIRCUMSCRIBED"})
    else:
        row.update({"breast density": density, "calc type": "PLEOMORPHIC" if pathology == M else "PUNCTATE",
                    "calc distribution": "CLUSTERED"})
    return row


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)

"""`folder` fixtures: class folders `root/<class>/*` or `root/images/` + `root/masks/`, mixed file types.

Images are small smooth scenes (a lesion-like blob on a shaded background), greyscale or RGB,
as PNG (8- and 16-bit), JPEG, TIFF and DICOM (16-bit: one windowed MONOCHROME2, one MONOCHROME1 without a window).
File names carry a patient id, `P01_...` (8 patients), for the `patients` option; by default the
reader splits by image. `scale="small"`: 64 px (some 64 x 80), 16 images; `scale="real"`: 512 px, 40.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.data.images import to_uint8

CLASSES = ("benign", "malignant", "normal")
N_PATIENTS = 8
FIXTURE_SPLITS = {**{f"P{i:02d}": "train" for i in range(1, 6)}, "P06": "validation", "P07": "test", "P08": "test"}
_SPLIT_DIR = {"train": "train", "validation": "val", "test": "test"}


def scene(rng: np.random.Generator, h: int, w: int, rgb: bool, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W) or (H, W, 3), codes (H, W) 0/1/2): a dark blob with a bright core."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    r = rng.uniform(0.15, 0.25) * min(h, w)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
    codes = (d < 1).astype(np.uint8) + (d < 0.45)
    base = 90 + 40 * yy / h + 25 * level - 60 * np.exp(-(d**2)) + 50 * (d < 0.45)
    grey = np.clip(base + rng.normal(0, 2, (h, w)), 0, 255).astype(np.uint8)
    img = np.stack([grey, np.clip(grey * 0.8 + 30, 0, 255).astype(np.uint8), np.roll(grey, 5, 1)], -1) if rgb else grey
    return img, codes


def write_dicom(path: Path, pixels: np.ndarray, monochrome1: bool = False, window: tuple[float, float] | None = None) -> None:
    """A minimal single-frame 16-bit greyscale DICOM (secondary capture)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    uid = generate_uid(entropy_srcs=[path.name])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.PatientID = SecondaryCaptureImageStorage, uid, "OT", path.stem.split("_")[0]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype("<u2").tobytes()
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def dicom_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM's linear VOI function to 0..255 (PS3.3 C.11.2.1.2.1), rounded half up."""
    return np.floor(np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_as(path: Path, img: np.ndarray, kind: str) -> np.ndarray:
    """Write `img` as png/png16/jpg/tif/rgba/dcm/dcm1; return what a reader must decode from the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "tif":
        import tifffile

        tifffile.imwrite(path, img, photometric="rgb" if img.ndim == 3 else "minisblack")
        return img
    if kind == "rgba":  # an opaque alpha channel, as exporters write it (dropped; a transparent image is refused)
        Image.fromarray(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])).save(path)
        return img
    if kind == "jpg":
        Image.fromarray(img).save(path, quality=92)
        with Image.open(path) as im:
            return np.array(im)
    raw = img.astype(np.float64) * 16 + 300  # 12-bit-like values in a 16-bit container
    if kind == "png16":
        Image.fromarray(raw.astype(np.uint16)).save(path)
        return to_uint8(raw)  # no window in a PNG: the 0.5..99.5 percentile range
    if kind in ("dcm", "dcm1"):
        if kind == "dcm":
            write_dicom(path, raw.astype(np.uint16), window=(2000.0, 3000.0))
            return dicom_window(raw, 2000.0, 3000.0)
        write_dicom(path, raw.astype(np.uint16), monochrome1=True)
        return 255 - to_uint8(raw)
    Image.fromarray(img).save(path)
    return img


# (file kind, RGB?) per image index: mostly PNG, one of every other type among them.
_KINDS = [("png", False), ("png", True), ("jpg", False), ("tif", True), ("dcm", False), ("rgba", True), ("dcm1", False),
          ("png", False), ("png16", False)]
_SUFFIX = {"png": ".png", "png16": ".png", "rgba": ".png", "jpg": ".jpg", "tif": ".tif", "dcm": ".dcm", "dcm1": ".dcm"}


def write(root: Path, *, seed: int = 0, scale: str = "small", layout: str = "classes", splits: bool = False) -> list[dict]:
    """Write a class-folder (`layout="classes"`) or image + mask (`"image-mask"`) source; return the expected samples.

    `splits=True` puts it under official split folders train/ val/ test/ (split by patient). Each sample's
    "patient_id" is the one in its file name: what the reader gives with -o patients='^(P\\d+)_' (by default
    the patient id is the sample id).
    """
    rng = np.random.default_rng(seed)
    size, per_patient = (512, 5) if scale == "real" else (64, 2)
    root = Path(root)
    expected = []
    for i in range(N_PATIENTS * per_patient):
        patient = f"P{i % N_PATIENTS + 1:02d}"
        kind, rgb = _KINDS[i % len(_KINDS)]
        if kind in ("dcm", "dcm1", "png16") and layout == "image-mask":
            kind = "png"
        h, w = (size, size + 16) if i % 5 == 4 else (size, size)  # some sizes differ
        label = CLASSES[i % len(CLASSES)] if layout == "classes" else None
        img, codes = scene(rng, h, w, rgb, CLASSES.index(label) if label else 0)
        split = FIXTURE_SPLITS[patient] if splits else None
        base = root / _SPLIT_DIR[split] if splits else root
        stem = f"{patient}_{i:03d}"
        if layout == "classes":
            sample_id = f"{label}_{stem}"
            decoded = save_as(base / label / (stem + _SUFFIX[kind]), img, kind)
            mask, prompt = None, label
        else:
            sample_id = stem
            decoded = save_as(base / "images" / (stem + _SUFFIX[kind]), img, kind)
            mask = codes if i % 3 == 0 else (codes > 0).astype(np.uint8)  # a few 3-code masks, most binary
            (base / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask if i % 3 == 0 else mask * 255).save(base / "masks" / f"{stem}.png")
            prompt = "medical image, " + ", ".join(f"class{c}" for c in np.unique(mask).tolist() if c)
        expected.append({"id": f"{_SPLIT_DIR[split]}_{sample_id}" if splits else sample_id, "patient_id": patient,
                         "split": split, "label": label, "image": decoded, "mask": mask, "prompt": prompt})
    return expected

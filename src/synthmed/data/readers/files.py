"""Image files of the generic formats (folder, manifest, diffusers): png/jpg/tif/dcm -> uint8 arrays.

Images come out as uint8 (H, W) for greyscale or (H, W, 3) for colour by the rules of data/images.py
(palette -> its colours, opaque alpha dropped, transparent images refused, deeper than 8 bits -> the
0.5..99.5 percentile window). DICOMs use their own VOI window (WindowCenter/WindowWidth, after
RescaleSlope/Intercept, DICOM's linear function) when they have one; MONOCHROME1 DICOMs are inverted so
that bright means dense. TIFFs PIL cannot read go through tifffile.
Masks come out as uint8 (H, W) class codes: a 0/255 mask becomes 0/1, other codes are kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.data.images import RULES, read_image, to_uint8
from synthmed.core.io import SynthmedError, load_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".bmp")
WINDOW_NOTE = ("images deeper than 8 bits mapped to 0..255 by the DICOM VOI window when present, "
               "else the 0.5..99.5 percentile range; MONOCHROME1 inverted; " + RULES)
CHANNELS = ("auto", "grey", "rgb")


def is_image(path: Path) -> bool:
    """A file whose suffix names an image format we read (hidden files excluded)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def load_image(path: Path, channels: str = "auto") -> np.ndarray:
    """An image file as uint8 (H, W) or (H, W, 3); `channels` "grey"/"rgb" converts, "auto" keeps."""
    path = Path(path)
    if not path.is_file():
        raise SynthmedError(f"{path}: file not found")
    if path.suffix.lower() == ".dcm":
        arr = _dicom_image(path)
    else:
        arr = _pixels(path, convert=True)
        if arr.dtype != np.uint8:
            arr = to_uint8(arr.astype(np.float64))
    arr = _planes(arr, path)
    if channels == "grey" and arr.ndim == 3:
        arr = np.array(Image.fromarray(arr).convert("L"))  # ITU-R 601 luma, as PIL
    elif channels == "rgb" and arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr)


def load_mask(path: Path, n_classes: int | None = None, option: str = "classes") -> np.ndarray:
    """A mask file as uint8 (H, W) class codes; 0/255 -> 0/1; codes above `n_classes` refused."""
    path = Path(path)
    if not path.is_file():
        raise SynthmedError(f"{path}: file not found")
    if path.suffix.lower() == ".dcm":
        arr = _dicom(path).pixel_array
    else:
        arr = _pixels(path, convert=False)
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4) and np.ptp(arr[..., :3].astype(np.int32), axis=2).any():
            raise SynthmedError(f"{path}: colour mask; expected one channel of class codes (0/255 or 0..K)")
        arr = arr[..., 0]
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise SynthmedError(f"{path}: mask holds non-integer values; expected class codes")
    arr = arr.astype(np.int64)
    codes = np.unique(arr)
    if codes.size and (codes[0] < 0 or codes[-1] > 255):
        raise SynthmedError(f"{path}: mask codes {codes[0]}..{codes[-1]} outside 0..255; expected class codes")
    if codes.size and codes[-1] == 255 and set(codes.tolist()) <= {0, 255}:
        arr = arr // 255  # a binary 0/255 mask: foreground is class 1
    mask = arr.astype(np.uint8)
    if n_classes is not None and mask.size and int(mask.max()) > n_classes:
        bad = sorted(c for c in np.unique(mask).tolist() if c > n_classes)
        raise SynthmedError(f"{path}: label code(s) {bad} not defined (option {option} names codes 1..{n_classes} only)")
    return mask


def max_code(paths) -> int:
    """The largest class code over the readable masks (unreadable ones fail later, in load)."""
    top = 0
    for p in paths:
        try:
            m = load_mask(p)
        except SynthmedError:
            continue
        top = max(top, int(m.max(initial=0)))
    return top


def class_names(classes: list[str] | None, masks) -> list[str]:
    """Mask class names for codes 1..K: the `classes` option, else class1..classK from the codes found."""
    if classes is not None:
        return list(classes)
    return [f"class{k}" for k in range(1, max_code(masks) + 1)]


def safe_ids(names: list[str]) -> list[str]:
    """File-name-safe ([A-Za-z0-9._+-]) and unique ids, in order (repeats get _2, _3, ...)."""
    out, seen = [], set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._+\-]+", "_", name).strip("._") or "image"
        sid, n = base, 1
        while sid in seen:
            n += 1
            sid = f"{base}_{n}"
        seen.add(sid)
        out.append(sid)
    return out


def _pixels(path: Path, convert: bool) -> np.ndarray:
    """PIL (raw values for masks, colour-converted for images), tifffile for TIFFs PIL cannot read."""
    if not convert:
        try:
            return load_png(path)
        except SynthmedError:
            if path.suffix.lower() not in (".tif", ".tiff"):
                raise
            return _tifffile(path)
    try:
        return read_image(path)
    except SynthmedError:
        if path.suffix.lower() not in (".tif", ".tiff") or _pil_opens(path):
            raise
        return _tifffile(path)


def _pil_opens(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def _tifffile(path: Path) -> np.ndarray:
    import tifffile

    try:
        arr = tifffile.imread(path, key=0)
    except Exception as exc:  # noqa: BLE001
        raise SynthmedError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (S, H, W) -> (H, W, S)
    return arr


def _planes(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W), (H, W, 1|2|3|4) -> (H, W) grey or (H, W, 3) RGB (alpha dropped)."""
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] in (1, 2):
        return arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[..., :3]
    raise SynthmedError(f"{path}: image of shape {arr.shape}; expected one 2D image (H, W[, 3])")


def _dicom(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise SynthmedError(f"{path}: cannot read DICOM ({type(exc).__name__}: {exc})") from None


def _dicom_image(path: Path) -> np.ndarray:
    """A DICOM's pixels to uint8: modality LUT, VOI window (or percentiles), MONOCHROME1 inverted."""
    ds = _dicom(path)
    try:
        px = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - e.g. a compressed transfer syntax without its decoder
        raise SynthmedError(f"{path}: cannot decode DICOM pixels ({type(exc).__name__}: {exc})") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SynthmedError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames); expected one 2D image")
    if px.ndim == 3:  # colour (pydicom gives RGB)
        return px if px.dtype == np.uint8 else to_uint8(px.astype(np.float64))
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    x = px.astype(np.float64) * slope + intercept
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = (float(v[0]) if isinstance(v, _multi_value()) else float(v) for v in (ds.WindowCenter, ds.WindowWidth))
        out = np.floor(np.clip((x - (c - 0.5)) / max(w - 1, 1.0) + 0.5, 0, 1) * 255 + 0.5).astype(np.uint8)
    elif px.dtype == np.uint8 and (slope, intercept) == (1.0, 0.0):
        out = px
    else:
        out = to_uint8(x)
    return 255 - out if ds.get("PhotometricInterpretation", "") == "MONOCHROME1" else out


def _multi_value():
    """pydicom's multi-valued element type (a window may list several centre/width pairs)."""
    from pydicom.multival import MultiValue

    return MultiValue

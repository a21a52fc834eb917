"""CBIS-DDSM (mammography): case-description CSVs + the TCIA DICOM tree.

One sample per full mammogram: the CSV rows naming the same image (one per abnormality)
are grouped, their ROI masks united, and the image labelled malignant if any abnormality
is MALIGNANT. The CSV paths rarely match the downloaded tree below their first folder
(`Mass-Training_P_00001_LEFT_CC/...`), so each path is resolved by that folder's name,
searched under ROOT (also one or two levels down, e.g. ROOT/CBIS-DDSM/).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from synthmed.data.prepared import Sample
from synthmed.data.images import to_uint8
from synthmed.data.readers.base import Item, Reader
from synthmed.core.io import SynthmedError

KINDS = {"mass": "mass", "calc": "calcification"}
CSV_NAME = "{kind}_case_description_{split}_set.csv"
REQUIRED = ("patient_id", "left or right breast", "image view", "abnormality id", "abnormality type",
            "pathology", "image file path", "ROI mask file path")
DENSITY = ("breast_density", "breast density")  # mass CSVs, calc CSVs
MALIGNANT, BENIGN = "MALIGNANT", ("BENIGN", "BENIGN_WITHOUT_CALLBACK")
MASK_CLASSES = {"lesion": ["lesion"], "type": ["mass", "calcification"], "pathology": ["benign lesion", "malignant lesion"]}
_DETAILS = {"mass shape": "shape", "mass margins": "margins", "calc type": "calc_type", "calc distribution": "calc_distribution"}
_SEARCH_DEPTH = 3
_NOT_EXTRA = ("problem", "roi_folder", "image_file_path", "laterality", "view", "density")


def _cell(row: dict, column: str) -> str:
    """One CSV cell, stripped ('' for a short row); paths in the real CSVs end in newlines."""
    return (row.get(column) or "").strip()


class CBISOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kinds: list[str] = Field(["mass", "calc"], description="which case-description CSVs to read: mass, calc")
    mask_classes: str = Field("lesion", description="lesion: code 1 for any ROI; type: 1 mass, 2 calcification; "
                                                    "pathology: 1 benign, 2 malignant (malignant wins where ROIs overlap)")
    window: str = Field("percentile", description="16-bit -> uint8: percentile (0.5-99.5 % per image) or minmax")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v):
        if not v or any(k not in KINDS for k in v):
            raise ValueError(f"expects kinds from {list(KINDS)}, but got {v}")
        return v

    @field_validator("mask_classes")
    @classmethod
    def _classes(cls, v):
        if v not in MASK_CLASSES:
            raise ValueError(f"expects one of {list(MASK_CLASSES)}, but got {v!r}")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v):
        if v not in ("percentile", "minmax"):
            raise ValueError(f"expects 'percentile' or 'minmax', but got {v!r}")
        return v


def first_folder(path: str) -> str:
    """The first component of a CSV path (the only part that matches the download)."""
    return path.strip().replace("\\", "/").strip("/").split("/")[0]


def find_folders(root: Path, names: set[str], depth: int = _SEARCH_DEPTH) -> dict[str, list[Path]]:
    """Folders under ROOT (up to `depth` levels down) whose name is in `names`; no descent into them."""
    found: dict[str, list[Path]] = {}
    level = [root]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.is_dir():
                    (found.setdefault(e.name, []).append(Path(e.path)) if e.name in names else nxt.append(Path(e.path)))
        level = nxt
    return found


def read_dicom(path: Path, header_only: bool = False):
    """A DICOM dataset, with a one-line error naming the file."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only)
        return ds if header_only else (ds, ds.pixel_array)
    except Exception as exc:  # pydicom raises many types for bad files; all mean "unreadable"
        raise SynthmedError(f"{path}: cannot read DICOM ({type(exc).__name__}: {exc})".replace("\n", " ")) from None


def dicoms(folder: Path) -> list[Path]:
    """The .dcm files under one series folder, in name order."""
    return sorted(folder.rglob("*.dcm"))


class CBISDDSMReader(Reader):
    name = "cbis-ddsm"
    patient_unit = "patient"
    layout = ("{mass,calc}_case_description_{train,test}_set.csv and the DICOM folders they name "
              "(e.g. CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/)")
    Options = CBISOptions
    default_conditioning = ("binary",)
    default_canny = {"sigma": 2.0, "low": 0.05, "high": 0.15}  # at 512 px, parenchyma texture below 2 px is not structure
    default_size = 512
    default_resize = "pad"

    def _csvs(self) -> list[tuple[Path, str, str]]:
        """(path, kind, official split) of each case-description CSV present."""
        out = []
        for kind in self.options.kinds:
            for split in ("train", "test"):
                p = self.root / CSV_NAME.format(kind=kind, split=split)
                if p.is_file():
                    out.append((p, kind, split))
        return out

    def _rows(self, path: Path):
        """(line, row) of one CSV, after checking its columns."""
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                cols = reader.fieldnames or []
                missing = [c for c in REQUIRED if c not in cols] + ([] if any(d in cols for d in DENSITY) else [DENSITY[0]])
                if missing:
                    raise SynthmedError(f"{path}: required column '{missing[0]}' missing (has: {', '.join(cols)})")
                end = reader.line_num
                for row in reader:
                    yield end + 1, row  # the record's first line (paths may hold newlines)
                    end = reader.line_num
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise SynthmedError(f"{path}: cannot read CSV ({type(exc).__name__}: {exc})") from None

    def items(self) -> list[Item]:
        csvs = self._csvs()
        if not csvs:
            raise self.empty()
        groups: dict[str, dict] = {}
        for path, kind, split in csvs:
            for line, row in self._rows(path):
                key = first_folder(_cell(row, "image file path"))
                if not key:
                    raise SynthmedError(f"{path}:{line}: image file path is empty")
                g = groups.setdefault(key, {"split": split, "kind": kind, "patient": _cell(row, "patient_id"), "rows": []})
                g["rows"].append(self._abnormality(path, line, row))
        folders = find_folders(self.root, set(groups) | {a["roi_folder"] for g in groups.values() for a in g["rows"]})
        out = []
        for key, g in groups.items():
            problems = [a["problem"] for a in g["rows"] if a["problem"]]
            image_dir = self._resolve(folders, key, g["rows"][0], "image file path", problems)
            rois = [(a, self._resolve(folders, a["roi_folder"], a, "ROI mask file path", problems)) for a in g["rows"]]
            label = "malignant" if any(a["pathology"] == MALIGNANT for a in g["rows"]) else "benign"
            out.append(Item(key, g["patient"], g["split"], (image_dir, rois, label, g["kind"], problems), label))
        return out

    def _abnormality(self, path: Path, line: int, row: dict) -> dict:
        """The facts of one CSV row (one abnormality), and its problem if any (raised at load)."""
        density = next(_cell(row, d) for d in DENSITY if d in row)
        info = {"id": _cell(row, "abnormality id"), "type": _cell(row, "abnormality type").lower(),
                "pathology": _cell(row, "pathology").upper(), "assessment": _cell(row, "assessment") or None,
                "subtlety": _cell(row, "subtlety") or None, **{short: _cell(row, col) or None for col, short in _DETAILS.items()},
                "csv": str(path), "line": line, "image_file_path": _cell(row, "image file path"),
                "roi_mask_file_path": _cell(row, "ROI mask file path"), "roi_folder": first_folder(_cell(row, "ROI mask file path")),
                "laterality": _cell(row, "left or right breast").lower(), "view": _cell(row, "image view").lower(),
                "density": int(density) if density.isdigit() else density, "problem": None}
        if info["pathology"] not in (MALIGNANT, *BENIGN):
            info["problem"] = f"{path}:{line}: pathology {info['pathology']!r} is not one of {[MALIGNANT, *BENIGN]}"
        elif info["type"] not in KINDS.values():
            info["problem"] = f"{path}:{line}: abnormality type {info['type']!r} is not mass or calcification"
        return info

    def _resolve(self, folders: dict, name: str, abn: dict, column: str, problems: list) -> str | None:
        """The one folder named `name`; else None, with the problem noted (raised at load, so --skip-bad skips it)."""
        hits = folders.get(name, [])
        if len(hits) == 1:
            return str(hits[0])
        where = f"{abn['csv']}:{abn['line']}: {column} '{abn[column.replace(' ', '_').lower()]}'"
        problems.append(f"{where} not found under {self.root} (no folder named {name})" if not hits
                        else f"{where} is ambiguous under {self.root} ({len(hits)} folders named {name})")
        return None

    def load(self, item: Item) -> Sample:
        image_dir, rois, label, kind, problems = item.ref
        if problems:
            raise SynthmedError(problems[0])
        image_path = self._full_image(Path(image_dir))
        image = self._window(image_path)
        mask = np.zeros(image.shape, np.uint8)
        for abn, roi_dir in rois:
            np.maximum(mask, self._roi_mask(Path(roi_dir), image.shape) * self._code(abn), out=mask)
        first = rois[0][0]
        abnormality = ", ".join(dict.fromkeys(a["type"] for a, _ in rois))
        extra = {"modality": "mammogram", "view": first["view"], "laterality": first["laterality"], "density": first["density"],
                 "pathology": label, "abnormality": abnormality, "kind": kind,
                 "abnormalities": [{k: v for k, v in a.items() if k not in _NOT_EXTRA} for a, _ in rois]}
        return Sample(id=item.id, image=image, split=item.split or "", prompt=f"mammogram, {first['view']} view, {label} {abnormality}",
                      patient_id=item.patient_id, source=str(image_path), mask=mask, label=label, extra=extra)

    def _full_image(self, folder: Path) -> Path:
        files = dicoms(folder)
        if len(files) != 1:
            raise SynthmedError(f"{folder}: expected one full-mammogram DICOM, found {len(files)}")
        return files[0]

    def _window(self, path: Path) -> np.ndarray:
        """16-bit -> uint8 by the chosen window; MONOCHROME1 inverted so that dense tissue is bright."""
        ds, px = read_dicom(path)
        if px.ndim != 2:
            raise SynthmedError(f"{path}: expected a single-frame greyscale DICOM, got pixel shape {px.shape}")
        lo_hi = (0.5, 99.5) if self.options.window == "percentile" else (0.0, 100.0)
        image = to_uint8(px, *lo_hi)
        if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
            image = 255 - image
        return image

    def _roi_mask(self, folder: Path, shape: tuple) -> np.ndarray:
        """The ROI mask among the folder's DICOMs (the full-size one; the other is the small crop), as 0/1."""
        files = dicoms(folder)
        if not files:
            raise SynthmedError(f"{folder}: no DICOM files (expected the ROI mask and the cropped image)")
        sizes = {p: self._size(p) for p in files}
        path = max(files, key=lambda p: (sizes[p][0] * sizes[p][1], sizes[p] == shape))
        if sizes[path] != shape:
            raise SynthmedError(f"{path}: ROI mask size {sizes[path]} differs from image size {shape}")
        _, px = read_dicom(path)
        values = set(np.unique(px).tolist())
        if not values <= {0, 255}:
            bad = sorted(values - {0, 255})[:5]
            raise SynthmedError(f"{path}: ROI mask holds values {bad} (expected only 0 and 255)")
        return (px == 255).astype(np.uint8)

    @staticmethod
    def _size(path: Path) -> tuple[int, int]:
        ds = read_dicom(path, header_only=True)
        try:
            return int(ds.Rows), int(ds.Columns)
        except AttributeError:
            raise SynthmedError(f"{path}: DICOM has no Rows/Columns (not an image)") from None

    def _code(self, abn: dict) -> int:
        if self.options.mask_classes == "type":
            return 2 if abn["type"] == "calcification" else 1
        if self.options.mask_classes == "pathology":
            return 2 if abn["pathology"] == MALIGNANT else 1
        return 1

    def card(self) -> dict:
        classes = MASK_CLASSES[self.options.mask_classes]
        lo_hi = "0.5-99.5 percentile" if self.options.window == "percentile" else "min-max"
        return {
            "source": "CBIS-DDSM, Curated Breast Imaging Subset of DDSM (TCIA, Lee et al. 2017): " + ", ".join(self.options.kinds),
            "task": "segmentation",
            "modality": "mammogram",
            "classes": classes,
            "label_map": {"0": "background", **{str(i): c for i, c in enumerate(classes, 1)}},
            "labels": ["benign", "malignant"],
            "notes": "one sample per full mammogram: its CSV rows (one per abnormality) grouped, ROI masks united "
                     f"(mask_classes={self.options.mask_classes}); label malignant (cancerous) if any abnormality is MALIGNANT, "
                     "else benign (BENIGN or BENIGN_WITHOUT_CALLBACK); per-abnormality facts in 'abnormalities'. "
                     "CSV paths are resolved by their first folder only (the tree below it differs in the download); the ROI "
                     "mask is the full-size DICOM of its folder, the cropped image the small one; a mask whose size differs from "
                     "its image is refused (a few in the real data: use --skip-bad). "
                     f"16-bit pixels -> uint8 by a per-image {lo_hi} window; MONOCHROME1 inverted. "
                     "Official train/test CSV splits kept; validation carved from train by patient. "
                     "A patient may appear in both mass and calc CSVs; patients_in_several_splits lists any crossing splits.",
        }

"""A CSV or JSONL manifest: one row per image, `image` required; `mask`, `label`, `prompt`, `patient_id`, `split` optional.

ROOT is the manifest itself or a folder holding exactly one `manifest.csv` / `manifest.jsonl`
(or the one named by option `file`). Paths are relative to the manifest's folder, or absolute.
Other columns are kept in `Sample.extra`, so `--prompt-template "{modality}, {label}"` can use them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader
from synthmed.data.readers.files import WINDOW_NOTE, class_names, load_image, load_mask, safe_ids
from synthmed.data.readers.folder import comma_list
from synthmed.core.io import SynthmedError

COLUMNS = ("image", "mask", "label", "prompt", "patient_id", "split")
SPLIT_VALUES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                "test": "test", "unlabelled": "unlabelled", "": None}
NAMES = ("manifest.csv", "manifest.jsonl")


class ManifestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str | None = Field(None, description="the manifest file (relative to ROOT); default: the one manifest.csv/.jsonl")
    classes: list[str] | None = Field(None, description="mask class names for codes 1..K; default class1..classK from the codes found")
    channels: Literal["auto", "grey", "rgb"] = Field("auto", description="auto keeps grey (H, W) / RGB as stored")

    _list = field_validator("classes", mode="before")(comma_list)


class ManifestReader(Reader):
    name = "manifest"
    patient_unit = "image"
    layout = "a manifest.csv or manifest.jsonl with an `image` column (ROOT may be the file itself)"
    Options = ManifestOptions
    default_conditioning = ("canny",)

    def __init__(self, root, options=None, seed: int = 0):
        super().__init__(root, options, seed)
        self.manifest = self._find()
        rows = self._rows()
        self.columns = sorted({k for _, row in rows for k in row})
        if "patient_id" in self.columns:
            self.patient_unit = "patient"
        self.has_masks = any(row.get("mask") for _, row in rows)
        if self.has_masks:
            self.default_conditioning = ("colour",)
        self._items: list[Item] | None = None
        self._classes: list[str] | None = None

    def __getstate__(self):
        # Workers need only the items' refs; the parsed rows are re-read if ever needed.
        return {k: v for k, v in self.__dict__.items() if k not in ("_parsed", "_items")}

    def _find(self) -> Path:
        if self.options.file:
            path = self.root / self.options.file if self.root.is_dir() else Path(self.options.file)
            if not path.is_file():
                raise SynthmedError(f"{path}: manifest file not found")
            return path
        if self.root.is_file():
            return self.root
        present = [self.root / n for n in NAMES if (self.root / n).is_file()]
        if not present:
            raise self.empty()
        if len(present) > 1:
            raise SynthmedError(f"{self.root}: both manifest.csv and manifest.jsonl; choose one with -o file=NAME")
        return present[0]

    def _rows(self) -> list[tuple[int, dict]]:
        """(line number, row) for every row; header, column and JSON problems are one-line errors."""
        if getattr(self, "_parsed", None) is None:
            is_csv = self.manifest.suffix.lower() in (".csv", ".tsv")
            self._parsed = self._read_csv() if is_csv else self._read_jsonl()
            if not self._parsed:
                raise SynthmedError(f"{self.manifest}: empty manifest (no rows)")
        return self._parsed

    def _read_csv(self) -> list[tuple[int, dict]]:
        m = self.manifest
        try:
            with open(m, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if m.suffix.lower() == ".tsv" else ",")
                if reader.fieldnames is None:
                    return []
                fields = [f.strip() for f in reader.fieldnames]
                if "image" not in fields:
                    raise SynthmedError(f"{m}: no 'image' column (columns: {', '.join(fields)})")
                reader.fieldnames = fields
                out = []
                for row in reader:
                    if None in row:
                        raise SynthmedError(f"{m}:{reader.line_num}: more fields than the header has columns")
                    out.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
                return out
        except (UnicodeDecodeError, csv.Error) as exc:
            raise SynthmedError(f"{m}: cannot read CSV ({type(exc).__name__}: {exc})") from None

    def _read_jsonl(self) -> list[tuple[int, dict]]:
        m, out = self.manifest, []
        try:
            lines = m.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise SynthmedError(f"{m}: cannot read ({exc})") from None
        for line, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SynthmedError(f"{m}:{line}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "image" not in row:
                raise SynthmedError(f"{m}:{line}: expected an object with an 'image' field")
            out.append((line, {k: (v.strip() if isinstance(v, str) else "" if v is None else v) for k, v in row.items()}))
        return out

    def items(self) -> list[Item]:
        if self._items is None:
            rows = self._rows()
            ids = safe_ids([Path(str(row["image"])).with_suffix("").as_posix().lstrip("/") for _, row in rows])
            self._items = [self._item(sid, line, row) for sid, (line, row) in zip(ids, rows)]
        return self._items

    def _item(self, sid: str, line: int, row: dict) -> Item:
        where = f"{self.manifest}:{line}"
        if not row["image"]:
            raise SynthmedError(f"{where}: empty image path")
        split = str(row.get("split", "")).lower()
        if split not in SPLIT_VALUES:
            raise SynthmedError(f"{where}: unknown split {row['split']!r} (expected train, validation/val, test)")
        patient = str(row.get("patient_id", sid))
        if not patient:
            raise SynthmedError(f"{where}: empty patient_id")
        label = str(row["label"]) if row.get("label") not in (None, "") else None
        extra = {k: v for k, v in row.items() if k not in COLUMNS}
        ref = (line, str(row["image"]), str(row.get("mask") or "") or None, label, str(row.get("prompt") or "") or None, extra)
        return Item(sid, patient, SPLIT_VALUES[split], ref, label)

    def _path(self, line: int, what: str, value: str) -> Path:
        path = Path(value) if Path(value).is_absolute() else self.manifest.parent / value
        if not path.is_file():
            raise SynthmedError(f"{self.manifest}:{line}: {what} {value!r} not found")
        return path

    def class_list(self) -> list[str]:
        """Mask class names for codes 1..K (scans the masks once when `classes` is not given)."""
        if not self.has_masks:
            return []
        if self._classes is None:
            base = self.manifest.parent
            masks = [p for p in (Path(it.ref[2]) if Path(it.ref[2]).is_absolute() else base / it.ref[2]
                                 for it in self.items() if it.ref[2]) if p.is_file()]
            self._classes = class_names(self.options.classes, masks)
        return self._classes

    def load(self, item: Item) -> Sample:
        line, image_path, mask_path, label, prompt, extra = item.ref
        path = self._path(line, "image", image_path)
        image = load_image(path, self.options.channels)
        mask = None
        if mask_path:
            mpath = self._path(line, "mask", mask_path)
            mask = load_mask(mpath, len(self.class_list()))
            if mask.shape != image.shape[:2]:
                raise SynthmedError(f"{path}: mask {mpath} size {mask.shape} differs from image size {image.shape[:2]}")
        return Sample(id=item.id, image=image, split=item.split or "", prompt=prompt or label or "medical image",
                      patient_id=item.patient_id, source=str(path), mask=mask, label=label, extra=dict(extra))

    def card(self) -> dict:
        classes = self.class_list()
        labels = sorted({it.ref[3] for it in self.items() if it.ref[3]})
        has_split = any(it.split for it in self.items())
        modalities = {str(it.ref[5].get("modality")) for it in self.items() if it.ref[5].get("modality")}
        extras = ", ".join(c for c in self.columns if c not in COLUMNS) or "none"
        notes = [f"rows of {self.manifest.name}; prompt = the row's prompt, else its label, else 'medical image'",
                 "official splits from the split column (val -> validation), rows without one seeded" if has_split else "no split column: seeded",
                 "split by patient_id" if self.patient_unit == "patient" else "no patient_id column: split by image",
                 f"extra columns kept as prompt fields: {extras}", "source sizes kept: pass --size N when image sizes vary", WINDOW_NOTE]
        if self.has_masks:
            notes.insert(1, "masks: 0/255 -> 0/1, other codes kept" + ("" if self.options.classes else "; names class1..K (set -o classes=a,b)"))
        return {
            "source": f"manifest {self.manifest.name} ({self.manifest.parent.name})",
            "task": "segmentation" if self.has_masks else "classification",
            "modality": modalities.pop() if len(modalities) == 1 else "unspecified",
            "classes": classes,
            "label_map": {str(k): n for k, n in enumerate(["background", *classes])} if self.has_masks else {},
            "labels": labels,
            "notes": "; ".join(notes),
        }

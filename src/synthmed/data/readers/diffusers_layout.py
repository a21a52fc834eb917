"""diffusers' ControlNet training layout: `metadata.jsonl` rows naming an image, its conditioning image and a caption.

    ROOT/metadata.jsonl                                  {"file_name": "images/0.png", "conditioning_image[_file_name]": ..., "text": ...}
    ROOT/{train,validation|val,test}/metadata.jsonl      the same, as official splits

`file_name` is the Hugging Face image-folder column; `image` (as in fill50k) is accepted too. The
column options mirror train_controlnet.py's --image_column / --conditioning_image_column /
--caption_column. A prepared data set (ours) is in this layout, so it reads back unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader
from synthmed.data.readers.files import WINDOW_NOTE, load_image, safe_ids
from synthmed.data.readers.folder import SPLIT_DIRS
from synthmed.core.io import SynthmedError
from synthmed.data.metadata import from_disk

SPLIT_ORDER = ("train", "validation", "test")
# Columns of our own prepared layout that are not prompt fields.
_NOT_EXTRA = {"file_name", "image", "conditioning_image", "text", "id", "label", "patient_id", "split", "source",
              "mask", "instance_mask", "paired_image"}


class DiffusersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_column: str | None = Field(None, description="default: file_name, else image")
    conditioning_column: str = "conditioning_image"
    caption_column: str = "text"
    metadata: str = Field("metadata.jsonl", description="the metadata file name in ROOT or in each split folder")
    channels: Literal["auto", "grey", "rgb"] = Field("auto", description="auto keeps grey (H, W) / RGB as stored")


class DiffusersReader(Reader):
    name = "diffusers"
    patient_unit = "image"
    layout = "metadata.jsonl (file_name|image, conditioning_image, text) in ROOT or in ROOT/{train,validation,test}/"
    Options = DiffusersOptions
    default_conditioning = ("given",)

    def __init__(self, root, options=None, seed: int = 0):
        super().__init__(root, options, seed)
        self.files = self._find()
        self._items: list[Item] | None = None

    def _find(self) -> list[tuple[str | None, Path]]:
        """[(official split or None, metadata file)]."""
        meta = self.options.metadata
        if self.root.is_file():
            return [(None, self.root)]
        split_files = sorted(((SPLIT_DIRS[d.name.lower()], d / meta) for d in self.root.iterdir()
                              if d.is_dir() and d.name.lower() in SPLIT_DIRS and (d / meta).is_file()),
                             key=lambda s: SPLIT_ORDER.index(s[0]))
        if (self.root / meta).is_file():
            if split_files:
                raise SynthmedError(f"{self.root}: both {meta} and split folders with their own; point --root at one")
            return [(None, self.root / meta)]
        if len({s for s, _ in split_files}) < len(split_files):
            raise SynthmedError(f"{self.root}: two folders for one split ({', '.join(str(p.parent.name) for _, p in split_files)})")
        return split_files

    def _rows(self, path: Path) -> list[tuple[int, dict]]:
        """(line, row) of one metadata file, with the three columns checked."""
        o, out = self.options, []
        for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SynthmedError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise SynthmedError(f"{path}:{line}: expected a JSON object")
            row = from_disk(row)  # `conditioning_image_file_name` (imagefolder's image columns) reads as `conditioning_image`
            image_col = o.image_column or ("file_name" if "file_name" in row else "image")
            for what, col, flag in (("image", image_col, "image_column"), ("conditioning image", o.conditioning_column, "conditioning_column"),
                                    ("caption", o.caption_column, "caption_column")):
                if not isinstance(row.get(col), str):
                    raise SynthmedError(f"{path}:{line}: no {what} column {col!r} (name it with -o {flag}=...)")
            out.append((line, {**row, "_image": row[image_col]}))
        return out

    def items(self) -> list[Item]:
        if self._items is None:
            found = [(split, path, line, row) for split, path in self.files for line, row in self._rows(path)]
            # Our own prepared rows carry patient_id = id for image-level sources: that is no patient identity.
            with_patients = bool(found) and all(isinstance(r.get("patient_id"), str) and r["patient_id"] for *_, r in found) \
                and any(r["patient_id"] != r.get("id") for *_, r in found)
            if with_patients:
                self.patient_unit = "patient"
            names = [str(r["id"]) if r.get("id") else (f"{p.parent.name}/" if s else "") + Path(r["_image"]).with_suffix("").as_posix()
                     for s, p, _, r in found]
            self._items = [self._item(sid, split, path, line, row, with_patients)
                           for sid, (split, path, line, row) in zip(safe_ids(names), found)]
        return self._items

    def _item(self, sid: str, split, path: Path, line: int, row: dict, with_patients: bool) -> Item:
        o = self.options
        label = str(row["label"]) if row.get("label") not in (None, "") else None
        skip = _NOT_EXTRA | {o.image_column, o.conditioning_column, o.caption_column, "_image"}
        extra = {k: v for k, v in row.items() if k not in skip and isinstance(v, (str, int, float, bool))}
        ref = (str(path), line, row["_image"], row[o.conditioning_column], row[o.caption_column], label, extra)
        return Item(sid, row["patient_id"] if with_patients else sid, split, ref, label)

    def load(self, item: Item) -> Sample:
        meta, line, image_name, cond_name, text, label, extra = item.ref
        image_path = self._file(Path(meta), line, "image", image_name)
        cond_path = self._file(Path(meta), line, "conditioning image", cond_name)
        image = load_image(image_path, self.options.channels)
        cond = load_image(cond_path)
        if cond.shape[:2] != image.shape[:2]:
            raise SynthmedError(f"{meta}:{line}: conditioning image {cond_name!r} size {cond.shape[:2]} differs from image size {image.shape[:2]}")
        return Sample(id=item.id, image=image, split=item.split or "", prompt=text, patient_id=item.patient_id,
                      source=str(image_path), label=label, extra=dict(extra), conditioning=cond)

    @staticmethod
    def _file(meta: Path, line: int, what: str, name: str) -> Path:
        """A file a row names, relative to its metadata file's folder (or absolute)."""
        path = Path(name) if Path(name).is_absolute() else meta.parent / name
        if not path.is_file():
            raise SynthmedError(f"{meta}:{line}: {what} {name!r} not found")
        return path

    def card(self) -> dict:
        items = self.items()
        labels = sorted({it.stratum for it in items if it.stratum})
        splits = "official split folders kept" if self.files and self.files[0][0] else "no split folders: split seeded by image"
        return {
            "source": f"diffusers ControlNet layout ({self.root.name})",
            "task": "paired translation",
            "modality": "unspecified",
            "classes": [],
            "label_map": {},
            "labels": labels,
            "notes": "; ".join([f"image, conditioning image and caption from {self.options.metadata}; the conditioning image is "
                                "given by the source (builder 'given'), resized like the image", splits,
                                "split by patient_id" if self.patient_unit == "patient" else "no patient ids: split by image",
                                "source sizes kept: pass --size N when image sizes vary", WINDOW_NOTE]),
        }

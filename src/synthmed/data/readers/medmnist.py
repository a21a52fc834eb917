"""MedMNIST v2 / MedMNIST+ 2D: `{flag}.npz` (28 px) or `{flag}_{size}.npz` (64, 128, 224).

The .npz members are read front to back, row by row (a compressed zip member cannot be
memory-mapped, and pathmnist_224's train images are 13.5 GB), so nothing is held whole.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader, npy_header
from synthmed.core.io import SynthmedError

# flag -> (modality phrase for prompts, class names in label-code order)
FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pathmnist": ("colon pathology, h&e", ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                           "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium")),
    "dermamnist": ("dermatoscopy", ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
                                    "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions")),
    "bloodmnist": ("blood cell microscopy", ("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                                             "monocyte", "neutrophil", "platelet")),
    "retinamnist": ("fundus photograph", ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4")),
    "octmnist": ("retinal oct", ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
    "pneumoniamnist": ("chest x-ray", ("normal", "pneumonia")),
    "chestmnist": ("chest x-ray", ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia")),
    "breastmnist": ("breast ultrasound", ("malignant", "normal or benign")),
    "tissuemnist": ("kidney cortex microscopy", ("collecting duct, connecting tubule", "distal convoluted tubule", "glomerular endothelial cells",
                                                 "interstitial endothelial cells", "leukocytes", "podocytes", "proximal tubule segments",
                                                 "thick ascending limb")),
    "organamnist": ("abdominal ct, axial", ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                                            "lung-left", "lung-right", "pancreas", "spleen")),
}
FLAGS["organcmnist"] = ("abdominal ct, coronal", FLAGS["organamnist"][1])
FLAGS["organsmnist"] = ("abdominal ct, sagittal", FLAGS["organamnist"][1])
MULTI_LABEL = {"chestmnist"}
RESOLUTIONS = (28, 64, 128, 224)
_SPLITS = {"train": "train", "val": "validation", "test": "test"}


class MedMNISTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flag: str = Field(..., description="pathmnist, breastmnist, ... (every 2D flag)")
    resolution: int | None = Field(None, description="source size 28/64/128/224; default: the one file present")


def npz_member_rows(path: Path, key: str):
    """Yield the rows of one .npz member in order, reading the zip stream row by row."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
            shape, fortran, dtype = npy_header(fh)
            if fortran:
                raise SynthmedError(f"{path}: member {key} is Fortran-ordered; expected C order")
            row_shape = shape[1:]
            nbytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
            for i in range(shape[0]):
                buf = fh.read(nbytes)
                if len(buf) != nbytes:
                    raise SynthmedError(f"{path}: member {key} is truncated at row {i} of {shape[0]}")
                yield np.frombuffer(buf, dtype).reshape(row_shape)
    except KeyError:
        raise SynthmedError(f"{path}: no member {key!r} (expected train/val/test _images and _labels)") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zipfile.LargeZipFile) as exc:
        raise SynthmedError(f"{path}: cannot read .npz ({type(exc).__name__}: {exc})") from None


def _member_shape(path: Path, key: str) -> tuple:
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
            return npy_header(fh)[0]
    except KeyError:
        raise SynthmedError(f"{path}: no member {key!r} (expected train/val/test _images and _labels)") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise SynthmedError(f"{path}: cannot read .npz ({type(exc).__name__}: {exc})") from None


class MedMNISTReader(Reader):
    name = "medmnist"
    patient_unit = "image"
    layout = "{flag}.npz or {flag}_{64,128,224}.npz with train/val/test _images and _labels"
    Options = MedMNISTOptions
    default_conditioning = ("canny",)

    def __init__(self, root, options=None, seed: int = 0):
        super().__init__(root, options, seed)
        flag = self.options.flag
        if flag not in FLAGS:
            raise SynthmedError(f"medmnist: unknown 2D flag {flag!r} (known: {', '.join(sorted(FLAGS))})")
        self.path = self._find(flag, self.options.resolution)

    def _find(self, flag: str, resolution: int | None) -> Path:
        if self.root.is_file():
            return self.root
        names = {r: self.root / (f"{flag}.npz" if r == 28 else f"{flag}_{r}.npz") for r in RESOLUTIONS}
        if resolution is not None:
            if resolution not in names:
                raise SynthmedError(f"medmnist: resolution must be one of {RESOLUTIONS}, got {resolution}")
            if not names[resolution].is_file():
                raise SynthmedError(f"{names[resolution]}: file not found")
            return names[resolution]
        present = [p for p in names.values() if p.is_file()]
        if not present:
            raise self.empty()
        if len(present) > 1:
            raise SynthmedError(f"{self.root}: several {flag} files ({', '.join(p.name for p in present)}); choose one with -o resolution=N")
        return present[0]

    def _labels(self, key: str) -> np.ndarray:
        rows = list(npz_member_rows(self.path, f"{key}_labels"))
        names = FLAGS[self.options.flag][1]
        width = len(names) if self.options.flag in MULTI_LABEL else 1
        # small: (N, 1) or (N, L); a split with no rows is (0, width); (N,) labels are read as (N, 1)
        labels = np.stack(rows).reshape(len(rows), -1) if rows else np.zeros((0, width), np.uint8)
        if self.options.flag in MULTI_LABEL:
            ok = labels.shape[1] == len(names) and np.isin(labels, (0, 1)).all()
        else:
            ok = labels.shape[1] == 1 and labels.min(initial=0) >= 0 and labels.max(initial=0) < len(names)
        if not ok:
            bad = labels.max(initial=0)
            raise SynthmedError(f"{self.path}: {key}_labels holds label code(s) not defined for {self.options.flag} "
                                f"(shape {labels.shape}, max {bad}; {len(names)} classes)")
        return labels

    def _label_name(self, row: np.ndarray) -> str:
        names = FLAGS[self.options.flag][1]
        if self.options.flag in MULTI_LABEL:
            return "|".join(names[i] for i in np.flatnonzero(row)) or "no finding"
        return names[int(row[0])]

    def items(self) -> list[Item]:
        out = []
        for key, split in _SPLITS.items():
            n = _member_shape(self.path, f"{key}_images")[0]
            labels = self._labels(key)
            if len(labels) != n:
                raise SynthmedError(f"{self.path}: {key}_images has {n} rows but {key}_labels has {len(labels)}")
            for i in range(n):
                label = self._label_name(labels[i])
                out.append(Item(f"{self.options.flag}_{key}_{i:06d}", f"{self.options.flag}_{key}_{i:06d}", split, (key, i, label), label))
        return out

    def stream(self, items):
        """Yield the Samples of `items` (in source order) reading each member front to back."""
        wanted: dict[str, dict[int, Item]] = {}
        for it in items:
            wanted.setdefault(it.ref[0], {})[it.ref[1]] = it
        for key in _SPLITS:
            todo = wanted.get(key)
            if not todo:
                continue
            last = max(todo)
            for i, row in enumerate(npz_member_rows(self.path, f"{key}_images")):
                if i in todo:
                    yield self._sample(todo[i], row)
                if i >= last:
                    break

    def load(self, item: Item) -> Sample:
        return next(iter(self.stream([item])))

    def _sample(self, item: Item, row: np.ndarray) -> Sample:
        if row.dtype != np.uint8 or row.ndim not in (2, 3):
            raise SynthmedError(f"{self.path}: {item.ref[0]}_images row {item.ref[1]} is {row.dtype} {row.shape}; expected uint8 (H, W[, 3])")
        modality = FLAGS[self.options.flag][0]
        label = item.ref[2]
        return Sample(id=item.id, image=np.array(row), split=item.split or "", prompt=f"{modality}, {label.replace('|', ', ')}",
                      patient_id=item.patient_id, source=f"{self.path}:{item.ref[0]}_images[{item.ref[1]}]", label=label,
                      extra={"modality": modality, "flag": self.options.flag})

    def card(self) -> dict:
        flag = self.options.flag
        names = FLAGS[flag][1]
        return {
            "source": f"MedMNIST {flag} ({self.path.name})",
            "task": "multi-label classification" if flag in MULTI_LABEL else "classification",
            "modality": FLAGS[flag][0],
            "classes": [],
            "labels": list(names),
            "label_map": {str(i): n for i, n in enumerate(names)},
            "notes": "official MedMNIST splits (val -> validation); no masks and no patient ids"
                     + ("; multi-label: label = the positive findings joined by '|', 'no finding' if none" if flag in MULTI_LABEL else ""),
        }

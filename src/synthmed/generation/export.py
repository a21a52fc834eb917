"""Export one split of a prepared data set (synthetic or real) into a source format that training code reads.

    folder    segmentation: OUT/images/<id>.png + OUT/masks/<id>.png (uint8 class codes)
              classification: OUT/<label>/<id>.png
    medmnist  OUT.npz (or OUT/{flag}[_{size}].npz): train_/val_/test_ images uint8 (N, H, W[, 3]) + labels uint8 (N, 1)
    pannuke   OUT/Fold N/images/foldN/{images,types}.npy + OUT/Fold N/masks/foldN/masks.npy, N = 1/2/3 for
              train/validation/test (PanNuke's usual protocol, and our reader's default fold_splits)

Each format is read back by the synthmed reader of the same name. Nothing is resized: a PanNuke export of
64 px tiles holds 64 x 64 patches (a warning says so). Outputs are written under a temporary name and renamed
into place; an existing output is refused, never overwritten.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.data.readers.pannuke import CLASSES as PANNUKE_CLASSES
from synthmed.data.readers.pannuke import DEFAULT_FOLD_SPLITS, TISSUES, tissue_phrase
from synthmed.data.prepared import read_card
from synthmed.core.outputs import check_output
from synthmed.core.io import SynthmedError, atomic_dir, load_png, save_png
from synthmed.data.metadata import read_metadata

FORMATS = ("folder", "medmnist", "pannuke")
FOLD_OF_SPLIT = {split: fold for fold, split in DEFAULT_FOLD_SPLITS.items()}
PANNUKE_SIZE = 256
_TISSUE_OF_PHRASE = {tissue_phrase(t): t for t in TISSUES}


@dataclass
class SplitRows:
    """One split of a prepared data set: its card and metadata rows (files are read on demand)."""

    root: Path
    split: str
    card: dict
    rows: list[dict]
    real: Path | None = None  # the real prepared set a synthetic one was generated from
    _real_rows: dict = field(default_factory=dict, repr=False)

    @property
    def folder(self) -> Path:
        return self.root / self.split

    @property
    def metadata(self) -> Path:
        return self.folder / "metadata.jsonl"

    def path(self, row: dict, key: str) -> Path:
        return self.folder / row[key]

    def source_row(self, row: dict) -> tuple[Path, dict] | None:
        """(split folder, row) of the real sample a synthetic row's mask came from, if known."""
        prov = row.get("provenance") or {}
        sid, split = prov.get("source_mask_id"), prov.get("source_split", "train")
        if sid is None or self.real is None:
            return None
        if split not in self._real_rows:
            rows = read_metadata(self.real / split / "metadata.jsonl")
            self._real_rows[split] = {r["id"]: r for r in rows}
        found = self._real_rows[split].get(sid)
        return (self.real / split, found) if found else None


def read_split(src: Path, split: str, real: Path | None = None) -> SplitRows:
    """The card and rows of one split; `real` defaults to the card's `real_data` (synthetic sets) when it exists."""
    src = Path(src)
    card = read_card(src)
    if split not in card.get("splits", {}):
        raise SynthmedError(f"{src}: no split {split!r} (has {sorted(card.get('splits', {}))})")
    rows = read_metadata(src / split / "metadata.jsonl")
    if not rows:
        raise SynthmedError(f"{src / split / 'metadata.jsonl'}: no samples")
    if real is None and card.get("real_data") and Path(card["real_data"]).is_dir():
        real = Path(card["real_data"])
    return SplitRows(src, split, card, rows, Path(real) if real else None)


def export_dataset(src: Path, fmt: str, out: Path, split: str = "train", real: Path | None = None) -> Path:
    """Write split `split` of the prepared set `src` as `fmt`; return what to point that format's reader at.

    `real` is the real prepared set a synthetic `src` was generated from (default: the card's `real_data`):
    it supplies label codes and instance masks a synthetic card or row lacks, and for medmnist the val/test
    keys (its validation and test splits; 0 rows without it).
    """
    if fmt not in FORMATS:
        raise ValueError(f"export_dataset expects fmt in {FORMATS}, but got {fmt!r}")
    data = read_split(src, split, real)
    return {"folder": export_folder, "medmnist": export_medmnist, "pannuke": export_pannuke}[fmt](data, Path(out))


# --- folder -----------------------------------------------------------------------------------------------


def export_folder(data: SplitRows, out: Path) -> Path:
    """Image + mask folders (rows with masks) or class folders (rows with labels only)."""
    check_output(out)
    seg = any("mask" in r for r in data.rows)
    with atomic_dir(out) as tmp:
        for row in data.rows:
            image = load_png(data.path(row, "file_name"))
            if seg:
                mask = _mask(data, row, image.shape[:2])
                (tmp / "images").mkdir(exist_ok=True)
                (tmp / "masks").mkdir(exist_ok=True)
                save_png(tmp / "images" / f"{row['id']}.png", image)
                save_png(tmp / "masks" / f"{row['id']}.png", mask)
            else:
                label = _folder_label(data, row)
                (tmp / label).mkdir(exist_ok=True)
                save_png(tmp / label / f"{row['id']}.png", image)
    return out


def _mask(data: SplitRows, row: dict, shape: tuple) -> np.ndarray:
    """A row's class-code mask (H, W) uint8, checked against its image size."""
    if "mask" not in row:
        raise SynthmedError(f"{data.metadata}: sample {row['id']} has no mask (every sample needs one for this export)")
    path = data.path(row, "mask")
    mask = load_png(path)
    if mask.ndim != 2 or mask.shape != shape:
        raise SynthmedError(f"{path}: mask shape {mask.shape} differs from its image {shape}")
    return mask.astype(np.uint8)


def _folder_label(data: SplitRows, row: dict) -> str:
    label = row.get("label")
    if not label:
        raise SynthmedError(f"{data.metadata}: sample {row['id']} has no label (a class-folder export needs one per sample)")
    if "/" in label or "\\" in label or label.startswith(".") or "\0" in label:
        raise SynthmedError(f"{data.metadata}: sample {row['id']}: label {label!r} cannot be a folder name")
    return label


# --- medmnist ---------------------------------------------------------------------------------------------


def export_medmnist(data: SplitRows, out: Path) -> Path:
    """A MedMNIST-style .npz: `data` as train_*, the real set's validation/test (if any) as val_*/test_*."""
    codes, multi = label_codes(data)
    grey = _channels(data) == 1
    train_images, train_labels = _medmnist_split(data, codes, multi, grey)
    arrays = {"train_images": train_images, "train_labels": train_labels}
    for split, key in (("validation", "val"), ("test", "test")):
        if data.real is not None and split in read_card(data.real).get("splits", {}):
            other = read_split(data.real, split)
            images, labels = _medmnist_split(other, codes, multi, grey)
            if images.shape[1:] != train_images.shape[1:]:
                raise SynthmedError(f"{other.metadata}: images {images.shape[1:]} differ from the exported {train_images.shape[1:]}")
        else:  # MedMNIST loaders index only the requested split; 0 rows keep all six keys present
            images = np.zeros((0, *train_images.shape[1:]), np.uint8)
            labels = np.zeros((0, train_labels.shape[1]), train_labels.dtype)
        arrays[f"{key}_images"], arrays[f"{key}_labels"] = images, labels
    path = _npz_path(data, out, train_images.shape[1:3])
    if path.exists():
        raise SynthmedError(f"{path}: output file exists (choose a new path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "xb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def label_codes(data: SplitRows) -> tuple[dict[str, int], bool]:
    """(label name -> source code, multi-label?) from the card, else from the real set's card.

    A classification card (no mask classes) maps codes to label names in `label_map`, e.g. MedMNIST's
    {"0": "adipose", ...}: the inverse gives the source's own integer codes. A segmentation card's label_map
    maps mask codes instead, so its image labels are coded by their position in `labels`.
    """
    cards = [data.card] + ([read_card(data.real)] if data.real is not None else [])
    for card in cards:
        multi = "multi-label" in card.get("task", "")
        if not card.get("classes") and card.get("label_map"):
            return {name: int(code) for code, name in card["label_map"].items()}, multi
        if card.get("labels"):
            return {name: code for code, name in enumerate(card["labels"])}, multi
    raise SynthmedError(f"{data.root / 'dataset.json'}: {NO_LABELS}")


NO_LABELS = ("no image-label list (`labels`) in this card or its real set's, so medmnist's per-image labels cannot be coded: "
             "medmnist is for classification sets; export a segmentation set as folder or pannuke")


def check_exportable(formats: list[str], card: dict | None = None, where: Path | None = None) -> None:
    """Refuse, before any work, an unknown format, or (given the data set's card) one it cannot be written as."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SynthmedError(f"unknown export format {unknown[0]!r} (known: {', '.join(FORMATS)})")
    if card is not None and "medmnist" in formats and not card.get("labels") and not (card.get("label_map") and not card.get("classes")):
        raise SynthmedError(f"{where}: {NO_LABELS}")


def _medmnist_split(data: SplitRows, codes: dict[str, int], multi: bool, grey: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W[, 3]) uint8 and labels (N, 1) (or (N, L) multi-label) uint8 of one split."""
    images, labels, first = [], [], None
    for row in data.rows:
        path = data.path(row, "file_name")
        image = _grey(load_png(path)) if grey else _rgb(load_png(path))
        first = first or (path, image.shape)
        if image.shape != first[1]:
            raise SynthmedError(f"{path}: size {image.shape} differs from {first[0].name}'s {first[1]} (prepare with --size)")
        images.append(image)
        labels.append(_label_vector(data, row, codes, multi))
    dtype = np.uint8 if max(codes.values(), default=0) < 256 else np.int64
    return np.stack(images), np.array(labels, dtype)


def _label_vector(data: SplitRows, row: dict, codes: dict[str, int], multi: bool) -> list[int]:
    label = row.get("label")
    if label is None:
        raise SynthmedError(f"{data.metadata}: sample {row['id']} has no label (MedMNIST needs one per sample)")
    names = [] if multi and label == "no finding" else (label.split("|") if multi else [label])
    unknown = [n for n in names if n not in codes]
    if unknown:
        raise SynthmedError(f"{data.metadata}: sample {row['id']}: label {unknown[0]!r} is not in the label map ({', '.join(codes)})")
    if not multi:
        return [codes[label]]
    vec = [0] * len(codes)
    for n in names:
        vec[codes[n]] = 1
    return vec


def _channels(data: SplitRows) -> int | None:
    """The card's channel count (1 = greyscale), else 1 if the first image is stored grey."""
    if data.card.get("channels") is not None:
        return int(data.card["channels"])
    return 1 if load_png(data.path(data.rows[0], "file_name")).ndim == 2 else 3


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8: a grey image as stored; RGB with equal channels exactly, else ITU-R 601 luma (PIL 'L')."""
    if image.ndim == 2:
        return image
    rgb = image[..., :3]
    if (rgb == rgb[..., :1]).all():
        return np.ascontiguousarray(rgb[..., 0])
    return np.array(Image.fromarray(rgb).convert("L"))


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def _npz_path(data: SplitRows, out: Path, size: tuple[int, int]) -> Path:
    """OUT itself if it names a .npz, else OUT/{flag}.npz (28 px) or OUT/{flag}_{size}.npz as MedMNIST names them.

    The flag is the rows' (data prepared from MedMNIST), else the real set's.
    """
    if out.suffix == ".npz":
        return out
    rows = list(data.rows)
    if data.real is not None and "train" in read_card(data.real).get("splits", {}):
        rows += read_split(data.real, "train").rows[:1]  # synthetic rows carry no flag: the real set's
    flag = next((r["flag"] for r in rows if r.get("flag")), None)
    if flag is None:
        raise SynthmedError(f"{out}: the rows name no MedMNIST flag to name the file by; give a file name, e.g. {out / 'pathmnist.npz'}")
    h, w = size
    return out / (f"{flag}.npz" if (h, w) == (28, 28) else f"{flag}_{h}.npz")


# --- pannuke ----------------------------------------------------------------------------------------------


def export_pannuke(data: SplitRows, out: Path) -> Path:
    """One PanNuke fold (fold from the split) under OUT; returns OUT, the root the pannuke reader reads."""
    if data.split not in FOLD_OF_SPLIT:
        raise SynthmedError(f"{data.root}: split {data.split!r} has no PanNuke fold (train -> 1, validation -> 2, test -> 3)")
    classes = list(data.card.get("classes", []))
    if classes != list(PANNUKE_CLASSES):
        raise SynthmedError(f"{data.root / 'dataset.json'}: mask classes {classes} are not PanNuke's {list(PANNUKE_CLASSES)}")
    fold = FOLD_OF_SPLIT[data.split]
    name = f"Fold {fold}"
    if (out / name).exists():
        raise SynthmedError(f"{out / name}: fold folder exists (choose a new output folder)")
    if out.exists() and not out.is_dir():
        raise SynthmedError(f"{out}: output path exists and is not a folder")
    # Into an existing root (other folds) only the fold folder is new; otherwise the whole root is.
    target, inner = (out / name, Path(".")) if out.is_dir() else (out, Path(name))
    with atomic_dir(target) as tmp:
        _write_fold(data, tmp / inner, fold)
    return out


def _write_fold(data: SplitRows, base: Path, fold: int) -> None:
    images_path = base / "images" / f"fold{fold}" / "images.npy"
    masks_path = base / "masks" / f"fold{fold}" / "masks.npy"
    n, shape, tissues = len(data.rows), None, []
    with _NpyRows(images_path) as images, _NpyRows(masks_path) as masks:
        for row in data.rows:
            image = _rgb(load_png(data.path(row, "file_name")))
            if shape is None:
                shape = image.shape[:2]
                images.begin((n, *shape, 3))
                masks.begin((n, *shape, 6))
            if image.shape[:2] != shape:
                raise SynthmedError(f"{data.path(row, 'file_name')}: size {image.shape[:2]} differs from the first image's {shape}")
            mask = _mask(data, row, shape)
            instances = _instances(data, row, mask)
            images.add(image.astype(np.float64))
            masks.add(pannuke_masks(mask, instances))
            tissues.append(_tissue(data, row))
    np.save(base / "images" / f"fold{fold}" / "types.npy", np.array(tissues))  # (N,) unicode, like the download
    if shape != (PANNUKE_SIZE, PANNUKE_SIZE):
        warnings.warn(f"PanNuke fold {fold}: patches exported at their size {shape[0]}x{shape[1]}, not PanNuke's "
                      f"{PANNUKE_SIZE}x{PANNUKE_SIZE} (nothing resized)", stacklevel=4)


def pannuke_masks(mask: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """(H, W) class codes 1..5 + (H, W) instance ids -> PanNuke's (H, W, 6) float64.

    Channel c (0..4) holds the instance ids of class c + 1 (0 elsewhere); channel 5 is 1 on background.
    """
    out = np.zeros((*mask.shape, 6), np.float64)
    for c in range(5):
        out[..., c] = np.where(mask == c + 1, instances, 0)
    out[..., 5] = mask == 0
    return out


def _instances(data: SplitRows, row: dict, mask: np.ndarray) -> np.ndarray:
    """A row's instance ids: its own instance_mask, or (synthetic rows) the one of the real sample its mask came from."""
    if "instance_mask" in row:
        path = data.path(row, "instance_mask")
    else:
        found = data.source_row(row)
        if found is None or "instance_mask" not in found[1]:
            hint = "" if data.real is None else f" and its source sample is not in {data.real} with instances"
            raise SynthmedError(f"{data.metadata}: sample {row['id']} has no instance_mask{hint} (PanNuke needs nucleus instances)")
        folder, real_row = found
        if not np.array_equal(load_png(folder / real_row["mask"]), mask):
            raise SynthmedError(f"{folder / real_row['mask']}: differs from the mask of synthetic sample {row['id']}; its instances do not apply")
        path = folder / real_row["instance_mask"]
    instances = load_png(path).astype(np.int64)
    if instances.shape != mask.shape:
        raise SynthmedError(f"{path}: shape {instances.shape} differs from the mask {mask.shape}")
    if int(mask.max(initial=0)) > 5:
        raise SynthmedError(f"{data.path(row, 'mask')}: class code {int(mask.max())} > 5; PanNuke has 5 nucleus classes")
    orphan = int(((mask > 0) & (instances == 0)).sum())
    if orphan:
        raise SynthmedError(f"{path}: {orphan} nucleus pixel(s) have no instance id")
    return instances


def _tissue(data: SplitRows, row: dict) -> str:
    """PanNuke tissue name from the row's tissue or label field (or its real source row's), e.g. 'kidney' -> 'Kidney'."""
    found = data.source_row(row)
    for r in (row, found[1] if found else {}):
        for value in (r.get("tissue"), r.get("label")):
            if isinstance(value, str) and (value in TISSUES or value.lower() in _TISSUE_OF_PHRASE):
                return value if value in TISSUES else _TISSUE_OF_PHRASE[value.lower()]
    raise SynthmedError(f"{data.metadata}: sample {row['id']}: tissue {row.get('tissue', row.get('label'))!r} "
                        f"is not a PanNuke tissue type ({', '.join(TISSUES)})")


class _NpyRows:
    """Write a C-ordered .npy row by row (a fold's masks are GBs: never built whole in memory)."""

    def __init__(self, path: Path):
        self.path, self.fh, self.shape, self.done = path, None, None, 0

    def __enter__(self):
        return self

    def begin(self, shape: tuple) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh, self.shape = open(self.path, "wb"), shape  # noqa: SIM115 (closed in __exit__)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float64)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.fh, header)

    def add(self, row: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(row, np.float64).tobytes())
        self.done += 1

    def __exit__(self, exc_type, *_):
        if self.fh is not None:
            self.fh.close()
        if exc_type is None and self.shape is not None and self.done != self.shape[0]:
            raise SynthmedError(f"{self.path}: wrote {self.done} of {self.shape[0]} rows")

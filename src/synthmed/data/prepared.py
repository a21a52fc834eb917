"""The prepared-dataset layout: Hugging Face image-folder + metadata.jsonl + dataset.json card.

    DIR/dataset.json                     card: source, classes, label map, splits, counts
    DIR/<split>/metadata.jsonl           one row per sample; `file_name` is the image
    DIR/<split>/images/<id>.png          the image
    DIR/<split>/masks/<id>.png           class codes 0..K (uint8), if the source has masks
    DIR/<split>/instances/<id>.png       instance ids (uint16), if the source has them
    DIR/<split>/conditioning/<id>.png    the ControlNet conditioning image

Rows also carry `conditioning_image_file_name` and `text`: `datasets`' imagefolder decodes every
`*_file_name` key as an image column (`conditioning_image`, `mask`, `instance_mask`), the columns diffusers'
ControlNet training script reads; plus `label`, `patient_id`, `split` and `source` for provenance.
In memory a row names its files `conditioning_image`, `mask`, ... (`data/metadata.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synthmed.data.conditioning import colour_mask
from synthmed.data.images import read_image
from synthmed.core.io import SynthmedError, atomic_dir, load_png, read_json, save_png, write_json
from synthmed.data.arrays import DiskArray, fingerprint, lazy_bytes, split_arrays
from synthmed.data.metadata import read_metadata, write_metadata

SPLITS = ("train", "validation", "test", "unlabelled")
CARD = "dataset.json"


@dataclass
class Sample:
    """The one sample record every reader yields."""

    id: str
    image: np.ndarray  # (H, W, 3) or (H, W) uint8
    split: str
    prompt: str
    patient_id: str
    source: str
    mask: np.ndarray | None = None  # (H, W) class codes
    instances: np.ndarray | None = None  # (H, W) instance ids
    label: str | None = None
    extra: dict = field(default_factory=dict)  # prompt fields and provenance (tissue, modality, ...)
    paired: np.ndarray | None = None  # a paired source image, e.g. the HE of an HE -> IHC pair
    conditioning: np.ndarray | None = None  # a conditioning image given by the source itself


def write_prepared(out: Path, samples, card: dict, progress=None, extras: dict[str, str] | None = None) -> dict:
    """Write samples into the prepared layout atomically and return the completed card.

    `extras` maps file names to text written beside the card (e.g. the resolved config).
    """
    out = Path(out)
    counts: dict[str, Counter] = {}
    patients: dict[str, set] = {}
    rows: dict[str, list] = {}
    with atomic_dir(out) as tmp:
        for sample in samples:
            if sample.split not in SPLITS:
                raise ValueError(f"write_prepared expects split in {SPLITS}, but got {sample.split!r}")
            rows.setdefault(sample.split, []).append(_write_sample(tmp / sample.split, sample))
            patients.setdefault(sample.split, set()).add(sample.patient_id)
            c = counts.setdefault(sample.split, Counter())
            c["samples"] += 1
            if sample.mask is not None:
                c["masked"] += 1
                codes, px = np.unique(sample.mask, return_counts=True)
                for code, n in zip(codes, px):
                    c[f"pixels:{int(code)}"] += int(n)
            if sample.instances is not None and sample.mask is not None:
                for code in _instance_classes(sample.instances, sample.mask):
                    c[f"objects:{code}"] += 1
            if progress:
                progress()
        if not rows:
            raise SynthmedError(f"{out}: no samples to write")
        for split, split_rows in rows.items():
            write_metadata(tmp / split / "metadata.jsonl", split_rows)
        card = dict(card)
        card["splits"] = {
            split: {
                "n": counts[split]["samples"],
                "patients": sorted(patients[split]),
                # None, not zeros, for a split without masks (e.g. unlabelled).
                "objects_per_class": _per_class(counts[split], "objects", card) if counts[split]["masked"] else None,
                "pixels_per_class": _per_class(counts[split], "pixels", card, background=True) if counts[split]["masked"] else None,
            }
            for split in rows
        }
        write_json(tmp / CARD, card)
        for name, text in (extras or {}).items():
            (tmp / name).write_text(text)
    return card


def _instance_classes(instances: np.ndarray, mask: np.ndarray) -> list[int]:
    """Class code of each visible instance (majority vote of its pixels)."""
    out = []
    for inst in np.unique(instances):
        if inst == 0:
            continue
        codes = mask[instances == inst]
        out.append(int(np.bincount(codes).argmax()))
    return out


def _per_class(counter: Counter, kind: str, card: dict, background: bool = False) -> dict:
    names = (["background"] if background else []) + list(card.get("classes", []))
    start = 0 if background else 1
    return {name: counter.get(f"{kind}:{code}", 0) for code, name in enumerate(names, start=start)}


def _write_sample(folder: Path, s: Sample) -> dict:
    for sub in ("images", "masks", "instances", "conditioning"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    row = {"file_name": f"images/{s.id}.png", "id": s.id, "text": s.prompt}
    save_png(folder / row["file_name"], s.image)
    if s.mask is not None:
        if s.mask.shape != s.image.shape[:2]:
            raise SynthmedError(f"{s.source}: mask shape {s.mask.shape} differs from image {s.image.shape[:2]}")
        row["mask"] = f"masks/{s.id}.png"
        row["conditioning_image"] = f"conditioning/{s.id}.png"
        save_png(folder / row["mask"], s.mask.astype(np.uint8))
        save_png(folder / row["conditioning_image"], colour_mask(s.mask))
    if s.instances is not None:
        row["instance_mask"] = f"instances/{s.id}.png"
        save_png(folder / row["instance_mask"], s.instances.astype(np.uint16))
    row.update(label=s.label, patient_id=s.patient_id, split=s.split, source=s.source, **s.extra)
    return row


@dataclass
class PreparedSplit:
    """One split of a prepared data set: rows, and images/masks as arrays (in memory) or DiskArrays (large splits:
    read by rows, `data/arrays.py`); index them in batches, `np.asarray` where the whole split is needed."""

    root: Path
    split: str
    rows: list[dict]
    images: np.ndarray  # (N, H, W, 3) uint8, or a DiskArray of that shape
    masks: np.ndarray | None  # (N, H, W) uint8, or a DiskArray

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    @property
    def prompts(self) -> list[str]:
        return [r["text"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


def label_target(row: dict, field: str, label_map: dict | None = None) -> str | None:
    """A row's classification target: its `field` value (as text) through `label_map`; None where the row has none."""
    value = row.get(field)
    return None if value is None else (label_map or {}).get(str(value), str(value))


def read_card(root: Path) -> dict:
    """Read dataset.json, with a one-line error if the folder is not a prepared data set."""
    root = Path(root)
    if not root.is_dir():
        raise SynthmedError(f"{root}: folder not found")
    if not (root / CARD).is_file():
        raise SynthmedError(f"{root}: not a prepared data set (no {CARD}; run `synthmed prepare` first)")
    return read_json(root / CARD)


def load_split(root: Path, split: str, limit: int | None = None, need_masks: bool = False) -> PreparedSplit:
    """Load one split's images (and masks, if present) into memory, checking every file as it is read.

    Images follow the rules of data/images.py (palette -> colours, opaque alpha dropped, transparency refused,
    16-bit -> the percentile window); every image must have the first one's size, every mask its image's size
    and only the class codes the card defines. A file that breaks a rule is a one-line error naming it.
    """
    root = Path(root)
    card = read_card(root)
    if split not in card.get("splits", {}):
        raise SynthmedError(f"{root}: no split {split!r} (has {sorted(card.get('splits', {}))})")
    rows = read_metadata(root / split / "metadata.jsonl")[:limit]
    if not rows:
        raise SynthmedError(f"{root / split / 'metadata.jsonl'}: no samples")
    folder = root / split
    has_masks = all("mask" in r for r in rows)
    if need_masks and not has_masks:
        raise SynthmedError(f"{folder / 'metadata.jsonl'}: split {split!r} has no masks")
    first = rgb_image(read_image(folder / _field(rows[0], "file_name", folder)))
    n_codes = len(card.get("classes") or []) or None

    def image(i: int) -> np.ndarray:
        arr = first if i == 0 else rgb_image(read_image(folder / _field(rows[i], "file_name", folder)))
        if arr.shape[:2] != first.shape[:2]:
            raise SynthmedError(f"{folder / rows[i]['file_name']}: size {arr.shape[1]}x{arr.shape[0]} differs from {folder / rows[0]['file_name']} "
                                f"({first.shape[1]}x{first.shape[0]}); prepare with --size")
        return arr

    readers = {"images": image}
    if has_masks:
        readers["masks"] = lambda i: read_mask(folder / rows[i]["mask"], first.shape[:2], n_codes)
    if len(rows) * first.nbytes * (4 if has_masks else 3) // 3 > lazy_bytes():  # large: decoded once, read by rows
        key = fingerprint(folder, rows, ("file_name", "mask"), extra=repr((split, len(rows), n_codes)))
        arrays = split_arrays(key, len(rows), readers)
    else:
        arrays = {kind: np.stack([read(i) for i in range(len(rows))]) for kind, read in readers.items()}
    return PreparedSplit(root, split, rows, arrays["images"], arrays.get("masks"))


def _field(row: dict, key: str, folder: Path) -> str:
    if not row.get(key):
        raise SynthmedError(f"{folder / 'metadata.jsonl'}: sample {row.get('id', '?')} has no {key}")
    return row[key]


def _label_map(path: Path, shape: tuple[int, int], what: str, values: str) -> np.ndarray:
    """A per-pixel label file (mask, instance ids): one channel of integers, the size of its image."""
    arr = load_png(path)
    if arr.ndim != 2:
        raise SynthmedError(f"{path}: {what} has {arr.shape[-1]} channels; expected one channel of {values}")
    if arr.dtype.kind not in "iu":
        raise SynthmedError(f"{path}: {what} holds {arr.dtype} values; expected integer {values}")
    if arr.shape != tuple(shape):
        raise SynthmedError(f"{path}: {what} size {arr.shape[1]}x{arr.shape[0]} differs from its image's {shape[1]}x{shape[0]}")
    return arr


def read_instances(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A prepared instance mask: one channel of instance ids (int32), the size of its image."""
    return _label_map(path, shape, "instance mask", "instance ids").astype(np.int32)


def read_mask(path: Path, shape: tuple[int, int], n_codes: int | None = None) -> np.ndarray:
    """A prepared mask: one channel of class codes 0..n_codes (palette indices are codes), the size of its image."""
    arr = _label_map(path, shape, "mask", "class codes")
    top = int(arr.max(initial=0))
    if n_codes is not None and top > n_codes:
        bad = [int(c) for c in np.unique(arr) if c > n_codes]
        raise SynthmedError(f"{path}: class code(s) {bad} beyond the {n_codes} classes of the card (0 background, 1..{n_codes})")
    if top > 255:
        raise SynthmedError(f"{path}: class codes up to {top}; at most 255 classes")
    return arr.astype(np.uint8)


def rgb_image(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., :3]


def load_conditioning(split: PreparedSplit) -> np.ndarray:
    """The split's conditioning images (N, H, W, C) uint8 as written by `prepare`: C is the file's own
    channel count (1 for a greyscale PNG such as an edge map, 3 for colour, K for an .npy stack).
    Each must have its image's size and the first one's channel count. A large split's (images in a DiskArray)
    is a DiskArray too, decoded once beside them."""
    folder = split.root / split.split
    shape = split.images.shape[1:3]
    first = _conditioning(folder, split.rows[0], shape)

    def read(i: int) -> np.ndarray:
        arr = first if i == 0 else _conditioning(folder, split.rows[i], shape)
        if arr.shape[2] != first.shape[2]:
            raise SynthmedError(f"{folder / split.rows[i]['conditioning_image']}: {arr.shape[2]} conditioning channel(s), "
                                f"but {folder / split.rows[0]['conditioning_image']} has {first.shape[2]}")
        return arr

    if isinstance(split.images, DiskArray):
        key = fingerprint(folder, split.rows, ("conditioning_image",), extra=repr(("conditioning", split.split, len(split), tuple(shape))))  # the size it was checked against
        return split_arrays(key, len(split), {"conditioning": read})["conditioning"]
    return np.stack([read(i) for i in range(len(split))])


def _conditioning(folder: Path, row: dict, shape) -> np.ndarray:
    path = folder / _field(row, "conditioning_image", folder)
    arr = _channels_last(load_conditioning_file(path))
    if arr.shape[:2] != tuple(shape):
        raise SynthmedError(f"{path}: conditioning size {arr.shape[1]}x{arr.shape[0]} differs from its image's {shape[1]}x{shape[0]}")
    return arr


def _channels_last(arr: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 1)."""
    return arr[..., None] if arr.ndim == 2 else arr


def load_conditioning_file(path: Path) -> np.ndarray:
    """One conditioning image: an image file by the rules of data/images.py, or .npy (H, W, C) uint8 when C
    is not 1 or 3 (one-hot, stacks)."""
    path = Path(path)
    if path.suffix != ".npy":
        return read_image(path)
    if not path.is_file():
        raise SynthmedError(f"{path}: file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SynthmedError(f"{path}: cannot read conditioning array ({exc})") from None
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise SynthmedError(f"{path}: conditioning array of {arr.dtype} {arr.shape}; expected uint8 (H, W, C)")
    return arr

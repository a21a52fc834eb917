"""`prepare`: any reader -> the prepared layout, streamed, in parallel, resumable, all or nothing.

Work goes to OUT.partial/ (one row per finished sample appended to rows.jsonl, files written
under temporary names and renamed); OUT appears only when every item is done. Re-running
with the same settings resumes OUT.partial, or is a no-op on a finished OUT.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.data.conditioning import EDGE_BUILDERS, ConditioningSpec, build_conditioning
from synthmed.data.prepared import CARD, SPLITS, Sample, _instance_classes
from synthmed.data.readers.base import Item, Reader
from synthmed.core.outputs import check_output, partial_of
from synthmed.core.io import SynthmedError, read_json, save_array, write_json, write_jsonl
from synthmed.data.metadata import to_disk

RESIZE_POLICIES = {
    "resize": "resized to SIZE x SIZE directly (aspect ratio not kept)",
    "crop": "shorter side scaled to SIZE, then centre-cropped to SIZE x SIZE",
    "pad": "longer side scaled to SIZE, then zero-padded (centred) to SIZE x SIZE",
}
_ID = re.compile(r"[A-Za-z0-9._+\-]+")


@dataclass(frozen=True)
class PrepareSettings:
    """Everything about a `prepare` run except the reader itself."""

    size: int | None = None  # None: keep the source size
    resize: str = "pad"
    limit: int | None = None  # at most this many samples per split (first in source order)
    workers: int = 1
    skip_bad: bool = False
    official_splits: bool = True
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    conditioning: ConditioningSpec = field(default_factory=ConditioningSpec)
    prompt_template: str | None = None
    fingerprint: str = ""  # the resolved settings as text; resume / no-op only when equal

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"PrepareSettings expects resize in {sorted(RESIZE_POLICIES)}, but got {self.resize!r}")
        if abs(sum(self.fractions) - 1) > 1e-6 or min(self.fractions) < 0:
            raise ValueError(f"PrepareSettings expects split fractions summing to 1, but got {self.fractions}")


# ---- splits ---------------------------------------------------------------------------------


def split_patients(patients, seed: int, fractions=(0.7, 0.15, 0.15), strata: dict | None = None) -> dict[str, str]:
    """Seeded patient-level split: patient -> train/validation/test, stratified by `strata`.

    Within each stratum the patients (sorted) are permuted by a generator seeded from
    (seed, stratum); the first round(f_val * n) go to validation, the next round(f_test * n)
    to test (at least one each in a stratum of 3 or more, so a rare class is tested). When
    the strata are all too small for that, a split that got nobody takes the next train
    patient in an order that interleaves the strata.
    """
    groups: dict[str, list[str]] = {}
    for p in sorted(set(patients)):
        groups.setdefault((strata or {}).get(p, ""), []).append(p)
    out, keyed = {}, []
    for stratum, members in sorted(groups.items()):
        rng = np.random.default_rng([seed, zlib.crc32(stratum.encode())])
        order = [members[i] for i in rng.permutation(len(members))]
        n = len(order)
        n_val, n_test = int(round(fractions[1] * n)), int(round(fractions[2] * n))
        if n >= 3:
            n_val, n_test = max(n_val, 1 if fractions[1] else 0), max(n_test, 1 if fractions[2] else 0)
        for i, p in enumerate(order):
            out[p] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
            keyed.append((i / n, stratum, p))
    if len(out) >= 3:
        for split, f in (("validation", fractions[1]), ("test", fractions[2])):
            if f and split not in out.values():
                out[next(p for _, _, p in sorted(keyed) if out[p] == "train")] = split
    return out


def assign_splits(items: list[Item], settings: PrepareSettings, patient_level: bool) -> tuple[list[Item], str]:
    """Give every item its split; returns the items and a sentence saying how."""
    keep = settings.official_splits and any(it.split not in (None, "unlabelled") for it in items)
    # "unlabelled" is not a split choice but a fact (no labels): it is never reassigned.
    fixed_split = lambda it: it.split == "unlabelled" or (keep and it.split)  # noqa: E731
    free = [it for it in items if not fixed_split(it)]
    strata = {}
    for it in items:  # strata of all items: carving validation from official train is stratified too
        if it.stratum is not None:
            strata.setdefault(it.patient_id, it.stratum)
    unit = "patient" if patient_level else "image (the source has no patient ids)"
    if keep:
        has_val = any(it.split == "validation" for it in items)
        if free:
            how = f"official splits kept; items without one split by {unit}, seeded"
        elif not has_val and patient_level:
            # Carve validation out of the official train split, by patient.
            train = [it.patient_id for it in items if it.split == "train"]
            f = settings.fractions[1] / (settings.fractions[0] + settings.fractions[1])
            val = {p for p, s in split_patients(train, settings.seed, (1 - f, f, 0.0), strata).items() if s == "validation"}
            items = [replace(it, split="validation") if it.split == "train" and it.patient_id in val else it for it in items]
            return _drop_held_out_unlabelled(items, f"official splits kept; validation carved from official train by {unit} ({f:.0%}, seeded)")
        else:
            return _drop_held_out_unlabelled(items, "official splits kept")
    else:
        how = f"split by {unit}, seeded {settings.seed}, fractions {list(settings.fractions)}"
    # Patients already in an official split stay there; the rest are split.
    fixed = {it.patient_id: it.split for it in items if keep and it.split not in (None, "unlabelled")}
    split_of = split_patients([p for p in {it.patient_id for it in free} if p not in fixed], settings.seed, settings.fractions, strata)
    split_of.update(fixed)
    items = [it if fixed_split(it) else replace(it, split=split_of[it.patient_id]) for it in items]
    return _drop_held_out_unlabelled(items, how)


def _drop_held_out_unlabelled(items: list[Item], how: str) -> tuple[list[Item], str]:
    """Unlabelled images of a validation/test patient would leak that patient into training."""
    held_out = {it.patient_id for it in items if it.split in ("validation", "test")}
    kept = [it for it in items if not (it.split == "unlabelled" and it.patient_id in held_out)]
    if len(kept) < len(items):
        how += f"; {len(items) - len(kept)} unlabelled items of validation/test patients left out"
    return kept, how


def apply_limit(items: list[Item], limit: int | None) -> list[Item]:
    """At most `limit` items per split, the first in source order."""
    if limit is None:
        return items
    seen: Counter = Counter()
    out = []
    for it in items:
        if seen[it.split] < limit:
            seen[it.split] += 1
            out.append(it)
    return out


# ---- one sample -----------------------------------------------------------------------------


def fit(array: np.ndarray, size: int | None, policy: str, nearest: bool) -> np.ndarray:
    """Apply the resize policy to an (H, W) or (H, W, C) array (nearest for label maps)."""
    if size is None:
        return array
    h, w = array.shape[:2]
    if policy == "resize":
        th, tw = size, size
    elif policy == "crop":
        s = size / min(h, w)
        th, tw = max(size, round(h * s)), max(size, round(w * s))
    else:
        s = size / max(h, w)
        th, tw = min(size, max(1, round(h * s))), min(size, max(1, round(w * s)))
    out = _resize(array, th, tw, nearest) if (th, tw) != (h, w) else array
    if policy == "crop":
        y, x = (th - size) // 2, (tw - size) // 2
        return out[y : y + size, x : x + size]
    if policy == "pad":
        y, x = (size - th) // 2, (size - tw) // 2
        canvas = np.zeros((size, size) + out.shape[2:], out.dtype)
        canvas[y : y + th, x : x + tw] = out
        return canvas
    return out


def _resize(array: np.ndarray, h: int, w: int, nearest: bool) -> np.ndarray:
    if nearest:
        if array.ndim == 3:
            return np.stack([_resize(array[..., c], h, w, True) for c in range(array.shape[2])], -1)
        return np.asarray(Image.fromarray(array.astype(np.int32), mode="I").resize((w, h), Image.NEAREST)).astype(array.dtype)
    if array.ndim == 3 and array.shape[2] not in (3, 4):
        return np.stack([_resize(array[..., c], h, w, False) for c in range(array.shape[2])], -1)
    return np.asarray(Image.fromarray(array).resize((w, h), Image.BICUBIC))




def finish_sample(sample: Sample, settings: PrepareSettings, folder: Path) -> tuple[dict, dict]:
    """Resize, build conditioning and prompt, write the files; returns (metadata row, stats)."""
    img = sample.image
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise SynthmedError(f"{sample.source}: image must be uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}")
    for name, arr in (("mask", sample.mask), ("instance mask", sample.instances), ("paired image", sample.paired), ("conditioning image", sample.conditioning)):
        if arr is not None and arr.shape[:2] != img.shape[:2]:
            raise SynthmedError(f"{sample.source}: {name} size {arr.shape[:2]} differs from image size {img.shape[:2]}")
    size, policy = settings.size, settings.resize
    image = fit(img, size, policy, nearest=False)
    mask = None if sample.mask is None else fit(sample.mask.astype(np.uint8), size, policy, nearest=True)
    inst = None if sample.instances is None else fit(sample.instances.astype(np.int32), size, policy, nearest=True)
    paired = None if sample.paired is None else fit(sample.paired, size, policy, nearest=False)
    given = None if sample.conditioning is None else fit(sample.conditioning, size, policy, nearest=False)

    # Everything that can fail (conditioning, prompt) runs before the first file is written,
    # so a sample skipped with --skip-bad leaves no stray files behind.
    fields = {"mask": mask, "paired": paired, "conditioning": given}
    need = settings.conditioning.requirement()
    missing = [b for b in need if fields[need[b]] is None]
    if missing and sample.split != "unlabelled":
        raise SynthmedError(f"{sample.source}: conditioning '{missing[0]}' needs a {need[missing[0]]}, which this sample does not have")
    shares_paired = settings.conditioning.builders == ("source",) and paired is not None
    cond = None if missing or shares_paired else build_conditioning(settings.conditioning, image, mask, inst, paired, given)
    text = render_prompt(sample, settings.prompt_template)

    sid = sample.id
    files = {"file_name": (f"images/{sid}.png", image), "mask": (f"masks/{sid}.png", mask),
             "instance_mask": (f"instances/{sid}.png", None if inst is None else inst.astype(np.uint16)),
             "paired_image": (f"paired/{sid}.png", paired)}
    if cond is not None:
        ext = "png" if cond.shape[2] in (1, 3) else "npy"
        files["conditioning_image"] = (f"conditioning/{sid}.{ext}", cond[..., 0] if cond.shape[2] == 1 else cond)
    row = {"file_name": files["file_name"][0], "id": sid}
    for key, (rel, arr) in files.items():
        if arr is not None:
            save_array(folder / rel, arr)
            row[key] = rel
    if shares_paired and not missing:
        row["conditioning_image"] = row["paired_image"]  # the same pixels: one file, not two
    row.update(text=text, label=sample.label, patient_id=sample.patient_id, split=sample.split, source=sample.source)
    row.update({k: v for k, v in sample.extra.items() if k not in row})
    stats = {"shape": list(image.shape), "label": sample.label,
             "paired_channels": None if paired is None else (paired.shape[2] if paired.ndim == 3 else 1),
             "given_channels": None if given is None else (given.shape[2] if given.ndim == 3 else 1)}
    if mask is not None:
        stats["pixels"] = {int(k): int(v) for k, v in enumerate(np.bincount(mask.ravel())) if v}
        if inst is not None:
            stats["objects"] = dict(Counter(_instance_classes(inst, mask)))
    return row, stats


class _Blank(dict):
    def __missing__(self, key):
        return ""


def render_prompt(sample: Sample, template: str | None) -> str:
    """The reader's prompt, or the user's template filled from the sample's fields."""
    if not template:
        return sample.prompt
    fields = {"label": sample.label or "", "patient_id": sample.patient_id, **sample.extra}
    fields = {k: (", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in fields.items()}
    if sample.split == "unlabelled":
        fields = _Blank(fields)  # unlabelled images lack label-derived fields: leave them empty
    try:
        return template.format_map(fields)
    except KeyError as exc:
        raise SynthmedError(f"prompt template names {{{exc.args[0]}}}, which this source does not provide (fields: {', '.join(sorted(fields))})") from None


# ---- the run --------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(reader: Reader, settings: PrepareSettings, root: Path) -> None:
    _WORKER.update(reader=reader, settings=settings, root=root)


def _process(job):
    order, item, sample = job
    reader, settings, root = _WORKER["reader"], _WORKER["settings"], _WORKER["root"]
    try:
        if sample is None:
            sample = reader.load(item)
        sample.id, sample.split, sample.patient_id = item.id, item.split, item.patient_id
        row, stats = finish_sample(sample, settings, root / item.split)
    except SynthmedError as exc:
        if not settings.skip_bad:
            raise
        return {"skipped": item.id, "split": item.split, "error": str(exc)}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        msg = f"{item.ref}: cannot read ({type(exc).__name__}: {exc})"
        if not settings.skip_bad:
            raise SynthmedError(msg) from None
        return {"skipped": item.id, "split": item.split, "error": msg}
    row["_order"], row["_stats"] = order, stats
    return row


def _read_rows(path: Path) -> list[dict]:
    """Rows committed so far. A line cut short by an interruption is cut off the file (redone)."""
    rows, good = [], 0
    if not path.is_file():
        return rows
    with open(path, "rb") as fh:
        for line in fh:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError
                rows.append(json.loads(line))
            except ValueError:
                break
            good += len(line)
    with open(path, "r+b") as fh:
        fh.truncate(good)
    return rows


def _iter_rows(path: Path):
    """Stream the committed rows (in source order: workers' results are committed in order)."""
    if path.is_file():
        with open(path) as fh:
            for line in fh:
                yield json.loads(line)


def prepare_dataset(reader: Reader, out: Path, settings: PrepareSettings, progress=None, extras: dict | None = None) -> dict:
    """Run a reader into OUT; returns the dataset.json card (existing one if already done)."""
    out = Path(out)
    if (out / CARD).is_file():
        card = read_json(out / CARD)
        if card.get("fingerprint") == settings.fingerprint:
            return card  # already prepared with these settings: nothing to do
        raise SynthmedError(f"{out}: already holds a prepared data set made with other settings (choose a new --out)")
    check_output(out)
    items = reader.items()
    if not items:
        raise reader.empty()
    bad = next((it.id for it in items if not _ID.fullmatch(it.id)), None)
    dup = next((k for k, n in Counter(it.id for it in items).items() if n > 1), None)
    if bad or dup:
        raise SynthmedError(f"{reader.root}: sample id {bad or dup!r} is {'not file-name safe' if bad else 'not unique'}")
    items, split_method = assign_splits(items, settings, reader.patient_unit != "image")
    items = apply_limit(items, settings.limit)

    partial = partial_of(out)
    stamp = partial / ".fingerprint"
    if partial.exists() and (not stamp.is_file() or stamp.read_text() != settings.fingerprint):
        raise SynthmedError(f"{partial}: an interrupted prepare with other settings is here; remove it or use the same settings")
    for split in {it.split for it in items}:
        for sub in ("images", "masks", "instances", "conditioning", "paired"):
            (partial / split / sub).mkdir(parents=True, exist_ok=True)
    stamp.write_text(settings.fingerprint)
    rows_path, skipped_path = partial / "rows.jsonl", partial / "skipped.jsonl"
    # Only ids are kept in memory; the rows themselves stay on disk (PCam has 327,680).
    finished = {r["id"] for r in _read_rows(rows_path)} | {r["skipped"] for r in _read_rows(skipped_path)}
    pending = [(i, it) for i, it in enumerate(items) if it.id not in finished]
    count = len(finished)
    if progress:
        progress(count, len(items))
    with open(rows_path, "a") as rows_fh, open(skipped_path, "a") as skip_fh:
        for result in _run(_jobs(reader, pending), reader, settings, partial):
            fh = skip_fh if "skipped" in result else rows_fh
            fh.write(json.dumps(result) + "\n")
            fh.flush()
            count += 1
            if progress:
                progress(count, len(items))
    skipped = _read_rows(skipped_path)
    card = _card(reader, _iter_rows(rows_path), skipped, settings, split_method)
    _finalise(partial, out, skipped, card, extras)
    return card


def _jobs(reader: Reader, pending):
    if reader.stream is None:
        return ((i, it, None) for i, it in pending)
    its = [it for _, it in pending]
    return ((i, it, s) for (i, it), s in zip(pending, reader.stream(its)))


def _run(jobs, reader: Reader, settings: PrepareSettings, root: Path):
    if settings.workers <= 1:
        _init_worker(reader, settings, root)
        yield from map(_process, jobs)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(settings.workers, initializer=_init_worker, initargs=(reader, settings, root)) as pool:
        yield from pool.imap(_process, jobs, chunksize=4)


class _SplitStats:
    """Per-split counts accumulated one row at a time."""

    def __init__(self):
        self.n, self.patients, self.labels = 0, set(), Counter()
        self.masked, self.with_instances, self.pixels, self.objects = 0, False, Counter(), Counter()

    def add(self, row: dict) -> None:
        st = row["_stats"]
        self.n += 1
        self.patients.add(row["patient_id"])
        if st["label"] is not None:
            self.labels.update(str(st["label"]).split("|"))
        if "pixels" in st:
            self.masked += 1
            self.pixels.update({int(k): v for k, v in st["pixels"].items()})
        if "objects" in st:
            self.with_instances = True
            self.objects.update({int(k): v for k, v in st["objects"].items()})

    def summary(self, classes: list[str]) -> dict:
        return {
            "n": self.n,
            "patients": sorted(self.patients),
            "labels_per_class": dict(sorted(self.labels.items())) or None,
            "objects_per_class": {c: self.objects.get(k, 0) for k, c in enumerate(classes, 1)} if self.with_instances else None,
            # None, not zeros, for a split without masks (e.g. unlabelled).
            "pixels_per_class": {c: self.pixels.get(k, 0) for k, c in enumerate(["background", *classes])} if self.masked else None,
        }


def _card(reader: Reader, rows, skipped, settings: PrepareSettings, split_method: str) -> dict:
    stats: dict[str, _SplitStats] = {}
    shapes, first = set(), None
    for row in rows:
        first = first or row
        shapes.add(tuple(row["_stats"]["shape"]))
        stats.setdefault(row["split"], _SplitStats()).add(row)
    if first is None:
        raise SynthmedError(f"{reader.root}: every item was skipped as bad ({len(skipped)}); nothing to write")
    base = reader.card()
    classes = base.get("classes", [])
    splits = {s: stats[s].summary(classes) for s in SPLITS if s in stats}
    seen: dict[str, set] = {}
    for split, info in splits.items():
        for p in info["patients"]:
            seen.setdefault(p, set()).add(split)
    spec = settings.conditioning
    cond_file = first.get("conditioning_image")
    sizes = {tuple(sh[:2]) for sh in shapes}
    chans = {1 if len(sh) == 2 else sh[2] for sh in shapes}
    return {
        "name": reader.name,
        "root": None if reader.generated else str(reader.root),
        **base,
        "image_size": list(sizes.pop()) if len(sizes) == 1 else None,  # None: sizes vary (prepare with --size)
        "channels": chans.pop() if len(chans) == 1 else None,  # None: grey and RGB mixed (-o channels=grey|rgb)
        "resize": {"size": settings.size, "policy": settings.resize if settings.size else "none (source size kept)",
                   "rule": RESIZE_POLICIES[settings.resize] if settings.size else None,
                   "image_interpolation": "bicubic (PIL, antialiased)", "mask_interpolation": "nearest"},
        "conditioning": {"builders": list(spec.builders), "channel_names": _channel_names(spec, first),
                         "file_format": Path(cond_file).suffix.lstrip(".") if cond_file else None,
                         "canny": {"sigma": spec.canny_sigma, "low": spec.canny_low, "high": spec.canny_high, "region": spec.canny_region} if set(spec.builders) & set(EDGE_BUILDERS) else None,
                         **({"tissue": {"sigma": spec.tissue_sigma}} if "tissue" in spec.builders else {})},
        "prompt_template": settings.prompt_template,
        "split_by": reader.patient_unit,
        "split_method": split_method,
        "patients_in_several_splits": sorted(p for p, s in seen.items() if len(s) > 1),
        "limit_per_split": settings.limit,
        "skipped": len(skipped),
        "fingerprint": settings.fingerprint,
        "splits": splits,
    }


def _channel_names(spec: ConditioningSpec, row: dict) -> list[str]:
    st = row["_stats"]
    return spec.channel_names(paired_channels=st.get("paired_channels") or 3, given_channels=st.get("given_channels") or 3)


def _flat(value):
    """Nested records (e.g. CBIS-DDSM's per-abnormality list) as JSON text: Hugging Face
    `imagefolder` infers one schema per metadata file and refuses splits whose nested
    fields differ (a null in one, a string in another)."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(x, (dict, list)) for x in value)):
        return json.dumps(value)
    return value


def _finalise(partial: Path, out: Path, skipped, card: dict, extras: dict | None) -> None:
    handles = {}
    try:
        for r in _iter_rows(partial / "rows.jsonl"):
            if r["split"] not in handles:
                handles[r["split"]] = open(partial / r["split"] / ".metadata.jsonl.tmp", "w")
            handles[r["split"]].write(json.dumps(to_disk({k: _flat(v) for k, v in r.items() if not k.startswith("_")})) + "\n")
    finally:
        for fh in handles.values():
            fh.close()
    for split in handles:
        os.replace(partial / split / ".metadata.jsonl.tmp", partial / split / "metadata.jsonl")
    for split_dir in [p for p in partial.iterdir() if p.is_dir()]:
        for sub in split_dir.iterdir():
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        if not any(split_dir.iterdir()):
            split_dir.rmdir()
    if skipped:
        write_jsonl(partial / "skipped.jsonl", [{"id": s["skipped"], "split": s["split"], "error": s["error"]} for s in skipped])
    else:
        (partial / "skipped.jsonl").unlink(missing_ok=True)
    (partial / "rows.jsonl").unlink(missing_ok=True)
    (partial / ".fingerprint").unlink(missing_ok=True)
    for name, text in (extras or {}).items():
        (partial / name).write_text(text)
    write_json(partial / CARD, card)
    if out.is_dir():
        shutil.rmtree(out)  # an empty folder only (checked at the start)
    os.replace(partial, out)

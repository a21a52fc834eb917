"""The on-disk state of a generation run: plan, layouts, finished samples, rejected draws.

While a run is in progress everything lives in OUT.partial/:

    plan.json, plan.jsonl              the plan (summary, one item per planned sample)
    train/{masks,instances,conditioning}/<id>.*   the planned layouts
    train/images/<id>.png              kept samples (written under a temporary name, then renamed)
    records/<id>.json                  written last, once a planned sample is finished (kept or dropped)
    rejected/images/<id>_a<k>.png      draws the quality filter rejected, with rejected/records/<id>_a<k>.json

A record is only ever written after its image, so a run killed at any moment resumes by
skipping the ids that have a record; a stray image without one is simply drawn again (the same
pixels: the seed is a function of the id and attempt). `finish` turns the records into
`train/metadata.jsonl` and `dataset.json` and renames OUT.partial to OUT: the manifest and the
files always match.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from synthmed.generation.layouts import Layout
from synthmed.core.io import SynthmedError, load_png, read_json, read_jsonl, save_array, write_json, write_jsonl
from synthmed.data.metadata import write_metadata

LAYOUT_DIRS = ("masks", "instances", "conditioning")


class GenerationStore:
    """Reads and writes one run's partial folder; every write is atomic."""

    def __init__(self, partial: Path):
        self.root = Path(partial)
        self.train = self.root / "train"

    # ---- plan -------------------------------------------------------------------------------
    def write_plan(self, summary: dict, entries: list[tuple[dict, Layout]]) -> None:
        """Layout files first, then plan.jsonl, then plan.json: plan.json marks a complete plan."""
        for sub in (*LAYOUT_DIRS, "images"):
            (self.train / sub).mkdir(parents=True, exist_ok=True)
        for item, layout in entries:
            item["files"] = self._write_layout(item["id"], layout)
        write_jsonl(self.root / "plan.jsonl", [item for item, _ in entries])
        write_json(self.root / "plan.json", summary)

    def _write_layout(self, sid: str, layout: Layout) -> dict:
        files = {}
        if layout.mask is not None:
            files["mask"] = f"masks/{sid}.png"
            save_array(self.train / files["mask"], layout.mask.astype(np.uint8))
        if layout.instances is not None:
            files["instance_mask"] = f"instances/{sid}.png"
            save_array(self.train / files["instance_mask"], layout.instances.astype(np.uint16))
        cond = layout.cond if layout.cond.ndim == 3 else layout.cond[..., None]
        ext = "png" if cond.shape[2] in (1, 3) else "npy"
        files["conditioning_image"] = f"conditioning/{sid}.{ext}"
        save_array(self.train / files["conditioning_image"], cond[..., 0] if cond.shape[2] == 1 else cond)
        return files

    def read_plan(self) -> tuple[dict, list[dict]]:
        if not (self.root / "plan.json").is_file():
            raise SynthmedError(f"{self.root}: no complete plan (plan.json missing)")
        return read_json(self.root / "plan.json"), read_jsonl(self.root / "plan.jsonl")

    def conditioning(self, item: dict) -> np.ndarray:
        """The planned conditioning image (H, W, C) uint8."""
        from synthmed.data.prepared import load_conditioning_file

        arr = load_conditioning_file(self.train / item["files"]["conditioning_image"])
        return arr[..., None] if arr.ndim == 2 else arr

    def mask(self, item: dict) -> np.ndarray | None:
        rel = item["files"].get("mask")
        return None if rel is None else load_png(self.train / rel)

    # ---- progress ---------------------------------------------------------------------------
    def finished(self) -> set[str]:
        """Ids with a record: kept or dropped for good."""
        folder = self.root / "records"
        return {p.stem for p in folder.glob("*.json")} if folder.is_dir() else set()

    def rejected_attempts(self) -> Counter:
        """id -> how many of its draws the filter has already rejected (the next attempt's number); one folder scan."""
        folder = self.root / "rejected" / "records"
        return Counter(p.stem.rsplit("_a", 1)[0] for p in folder.glob("*.json")) if folder.is_dir() else Counter()

    def keep(self, item: dict, image: np.ndarray, record: dict) -> None:
        (self.root / "records").mkdir(exist_ok=True)
        save_array(self.train / "images" / f"{item['id']}.png", image)
        write_json(self.root / "records" / f"{item['id']}.json", {"status": "kept", **record})

    def reject(self, item: dict, image: np.ndarray, record: dict, final: bool) -> None:
        """Keep a rejected draw for inspection; `final` marks the planned sample as dropped."""
        name = f"{item['id']}_a{record['attempt']}"
        for sub in ("images", "records"):
            (self.root / "rejected" / sub).mkdir(parents=True, exist_ok=True)
        save_array(self.root / "rejected" / "images" / f"{name}.png", image)
        write_json(self.root / "rejected" / "records" / f"{name}.json", {"id": item["id"], **record})
        if final:
            (self.root / "records").mkdir(exist_ok=True)
            write_json(self.root / "records" / f"{item['id']}.json", {"status": "dropped", **record})

    # ---- the end ----------------------------------------------------------------------------
    def finish(self, out: Path, card: dict, row_of, extras: dict[str, str] | None = None, before_rename=None) -> dict:
        """Write the manifests and the card, then rename the partial folder to `out`."""
        summary, items = self.read_plan()
        records = {sid: read_json(self.root / "records" / f"{sid}.json") for sid in self.finished()}
        missing = [it["id"] for it in items if it["id"] not in records]
        if missing:
            raise SynthmedError(f"{self.root}: {len(missing)} planned samples unfinished (first {missing[0]})")
        rows, dropped = [], []
        for item in items:
            rec = records[item["id"]]
            if rec["status"] == "kept":
                rows.append(row_of(item, rec))
            else:
                dropped.append(item)
                self._move_dropped_layout(item)
        if not rows:
            grey = [r for r in self._rejected_records() if (r.get("scores") or {}).get("colour_residual") is not None]
            why = (f"; greyscale data, median colour residual {np.median([r['scores']['colour_residual'] for r in grey]):.1f} grey levels: "
                   "the model draws colour (a colour-pretrained backbone?)" if grey else "")
            raise SynthmedError(f"{self.root}: the quality filter dropped every sample (scores in {self.root / 'rejected'}{why}); lower its threshold "
                                f"or train longer, and remove {self.root} to run again with other settings")
        write_metadata(self.train / "metadata.jsonl", rows)
        self._write_rejected_manifest(items)
        card = dict(card)
        card["splits"] = {"train": _split_counts(rows, card.get("classes", []))}
        card["plan"] = {**summary, "achieved": _achieved(summary, rows)}
        card["filter_summary"] = _filter_counts(items, records, self._rejected_records())
        write_json(self.root / "dataset.json", card)
        for name, text in (extras or {}).items():
            (self.root / name).write_text(text)
        if before_rename:
            before_rename(self.root)
        out = Path(out)
        if out.is_dir():
            shutil.rmtree(out)  # an empty folder or a marker-only folder
        os.replace(self.root, out)
        return card

    def _move_dropped_layout(self, item: dict) -> None:
        dest = self.root / "rejected" / "layouts"
        dest.mkdir(parents=True, exist_ok=True)
        for rel in item["files"].values():
            src = self.train / rel
            if src.exists():
                os.replace(src, dest / src.name.replace(item["id"], f"{item['id']}_{Path(rel).parts[0]}"))

    def _rejected_records(self) -> list[dict]:
        folder = self.root / "rejected" / "records"
        return [read_json(p) for p in folder.glob("*.json")] if folder.is_dir() else []

    def _write_rejected_manifest(self, items: list[dict]) -> None:
        recs = self._rejected_records()
        if not recs:
            return
        order = {it["id"]: it["index"] for it in items}
        recs.sort(key=lambda r: (order[r["id"]], r["attempt"]))
        write_metadata(self.root / "rejected" / "metadata.jsonl", [{"file_name": f"images/{r['id']}_a{r['attempt']}.png", **r} for r in recs])


def _achieved(summary: dict, rows: list[dict]) -> dict:
    """Real + kept synthetic counts per class: the plan's `combined` less what the filter dropped."""
    kept: Counter = Counter()
    for r in rows:
        if summary["unit"] == "images":
            kept[str(r.get("label"))] += 1
        else:
            kept.update(r.get("objects" if summary["unit"] == "objects" else "pixels") or {})
    return {c: n + kept.get(c, 0) for c, n in summary["real"].items()}


def _split_counts(rows: list[dict], classes: list[str]) -> dict:
    """The card's per-split counts (as `prepare` writes them) for the kept synthetic rows."""
    objects, pixels, labels = Counter(), Counter(), Counter()
    for r in rows:
        objects.update(r.get("objects") or {})
        pixels.update(r.get("pixels") or {})
        if r.get("label") is not None:
            labels[str(r["label"])] += 1
    masked = any("mask" in r for r in rows)
    return {
        "n": len(rows),
        "patients": sorted({r["patient_id"] for r in rows}),
        "labels_per_class": dict(sorted(labels.items())) or None,
        "objects_per_class": {c: objects.get(c, 0) for c in classes} if any("instance_mask" in r for r in rows) else None,
        "pixels_per_class": {c: pixels.get(c, 0) for c in classes} if masked else None,
    }


def _filter_counts(items: list[dict], records: dict, rejected: list[dict]) -> dict:
    """Kept and dropped planned samples per class (the class a sample was planned for), and mean judge scores."""
    kept, dropped = Counter(), Counter()
    for item in items:
        for c in item.get("focus") or [str(item.get("label"))]:
            (kept if records[item["id"]]["status"] == "kept" else dropped)[c] += 1
    kept_scores = [r["scores"] for r in records.values() if r["status"] == "kept"]
    return {"kept_per_class": dict(kept), "dropped_per_class": dict(dropped),
            "kept": sum(r["status"] == "kept" for r in records.values()), "dropped": sum(r["status"] == "dropped" for r in records.values()),
            "rejected_draws": len(rejected), "mean_scores_kept": _means(kept_scores), "mean_scores_rejected_draws": _means([r["scores"] for r in rejected])}


def _means(scores: list[dict]) -> dict:
    keys = sorted({k for s in scores for k in s})
    return {k: float(np.mean([s[k] for s in scores if s.get(k) is not None])) for k in keys}

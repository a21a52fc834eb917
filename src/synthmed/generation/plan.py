"""The generation plan: how many synthetic samples of which class, and the layout of each one.

Counts come from the real training split: objects per class where the data has instances
(a rare nucleus class), pixels per class for masks without instances (a small tumour class),
images per label for classification. A target (`balance` every class to the largest,
`multiply` a class by N, or explicit `counts` to add) gives the deficit of each class, and the
planner makes layouts from training masks only (flips/rotations, elastic deformation, rare-class
objects pasted in from other training masks) until the deficits are met or `max_samples` is
reached. Everything is drawn from one seeded generator, so the plan is reproducible, and it is
written before any sampling starts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from synthmed.generation.layouts import Layout, copy_paste, count_objects, count_pixels, dihedral_layout, elastic_layout, update_row


_FILE_COLUMNS = {"file_name", "mask", "instance_mask", "conditioning_image", "paired_image", "text", "label", "id", "split", "source"}


@dataclass
class TrainingLayouts:
    """The real training split as the planner sees it: ids, rows, masks, instances, conditioning."""

    rows: list[dict]
    classes: list[str]  # class names of mask codes 1..K (segmentation) or of labels (classification)
    masks: np.ndarray | None  # (N, H, W) uint8
    instances: list[np.ndarray | None]
    cond: np.ndarray  # (N, H, W, C) uint8
    labels: list[str | None] = field(default_factory=list)
    spec: object = None  # the data set's ConditioningSpec: mask-derived channels are rebuilt after an edit

    def layout(self, i: int) -> Layout:
        mask = None if self.masks is None else self.masks[i]
        return Layout(mask, self.instances[i], self.cond[i], {"source_id": self.rows[i]["id"], "ops": []}, spec=self.spec)


def unit_of(train: TrainingLayouts, unit: str) -> str:
    """What the plan counts: objects, pixels or images."""
    if unit != "auto":
        if unit in ("objects", "pixels") and train.masks is None:
            raise ValueError(f"plan expects masks to count {unit}, but the training split has none")
        return unit
    if train.masks is None:
        return "images"
    return "objects" if all(i is not None for i in train.instances) else "pixels"


def real_counts(train: TrainingLayouts, unit: str) -> dict[str, int]:
    """Per-class counts of the real training split in the plan's unit."""
    if unit == "images":
        c = Counter(str(x) for x in train.labels if x is not None)
        names = train.classes if train.masks is None else sorted(c)  # with masks, `classes` names mask codes, not labels
        return {name: c.get(name, 0) for name in names}
    total: Counter = Counter()
    for i in range(len(train.rows)):
        counts = count_objects(train.masks[i], train.instances[i]) if unit == "objects" else count_pixels(train.masks[i])
        total.update(counts)
    return {name: int(total.get(code, 0)) for code, name in enumerate(train.classes, start=1)}


def additions(real: dict[str, int], mode: str, classes: list[str] | None, factor: float, counts: dict[str, int]) -> dict[str, int]:
    """How much of each class the plan adds, from the real counts and the target."""
    unknown = sorted((set(classes or []) | set(counts)) - set(real))
    if unknown:
        raise ValueError(f"plan expects classes among {sorted(real)}, but got {unknown}")
    chosen = classes or list(real)
    if mode == "balance":
        top = max(real.values())
        return {c: max(0, top - real[c]) if c in chosen else 0 for c in real}
    if mode == "multiply":
        if not classes:
            raise ValueError("plan mode multiply expects `classes` (which classes to multiply), but got none")
        return {c: int(round(real[c] * (factor - 1))) if c in chosen else 0 for c in real}
    if mode == "counts":
        if not counts:
            raise ValueError("plan mode counts expects `counts` ({class: how many to add}), but got none")
        return {c: int(counts.get(c, 0)) for c in real}
    raise ValueError(f"additions expects mode balance, multiply or counts, but got {mode!r}")


def _cycle(indices: np.ndarray, rng: np.random.Generator):
    """Endless seeded permutations of `indices`."""
    while True:
        yield from rng.permutation(indices)


def _new_layout(train: TrainingLayouts, i: int, lay_cfg, rng: np.random.Generator) -> Layout:
    """A training layout with a random flip/rotation and, sometimes, an elastic deformation."""
    layout = train.layout(i)
    if lay_cfg.flips:
        square = layout.cond.shape[0] == layout.cond.shape[1]
        k = int(rng.choice(8 if square else [0, 2, 4, 6]))  # the 4 shape-keeping views when not square
        layout = dihedral_layout(layout, k)
    if lay_cfg.elastic > 0 and rng.random() < lay_cfg.elastic:
        layout = elastic_layout(layout, int(rng.integers(2**31)), magnitude=tuple(lay_cfg.elastic_magnitude))
    return layout


def plan_replay(train: TrainingLayouts, n: int, seed: int) -> list[tuple[dict, Layout]]:
    """n training layouts as they are (seeded order, each used once before any repeats)."""
    rng = np.random.default_rng(seed)
    order = _cycle(np.arange(len(train.rows)), rng)
    return [_item(train, i, train.layout(i), None) for i in (int(next(order)) for _ in range(n))]


def _item(train: TrainingLayouts, i: int, layout: Layout, focus: list[str] | None, label: str | None = None) -> tuple[dict, Layout]:
    row = train.rows[i]
    item = {"source_id": row["id"], "patient_id": row.get("patient_id"), "label": label if label is not None else row.get("label"), "focus": focus or [],
            "row_fields": {k: v for k, v in row.items() if k not in _FILE_COLUMNS and isinstance(v, (str, int, float))},
            "layout": layout.record.get("ops", []), "prompt": row["text"]}
    if layout.mask is not None:
        updated = update_row(row, layout.mask, train.classes)
        item["prompt"] = updated["text"]
        if "classes" in updated:
            item["classes"] = updated["classes"]
        objects = count_objects(layout.mask, layout.instances)
        item["objects"] = {name: int(objects.get(code, 0)) for code, name in enumerate(train.classes, start=1)}
        pixels = count_pixels(layout.mask)
        item["pixels"] = {name: int(pixels.get(code, 0)) for code, name in enumerate(train.classes, start=1)}
    return item, layout


def plan_segmentation(train: TrainingLayouts, add: dict[str, int], unit: str, lay_cfg, max_samples: int, seed: int) -> list[tuple[dict, Layout]]:
    """Layouts until every class's deficit (objects or pixels) is met, or max_samples."""
    rng = np.random.default_rng(seed)
    codes = {name: code for code, name in enumerate(train.classes, start=1)}
    focus = [c for c, n in add.items() if n > 0]
    has = np.array([[np.any(train.masks[i] == codes[c]) for c in focus] for i in range(len(train.rows))])  # (N, F)
    rich = np.flatnonzero(has.any(1)) if len(focus) else np.arange(len(train.rows))
    sources = _cycle(rich if len(rich) else np.arange(len(train.rows)), rng)
    got: Counter = Counter()
    out = []
    while any(got[c] < add[c] for c in focus) and len(out) < max_samples:
        i = int(next(sources))
        layout = _new_layout(train, i, lay_cfg, rng)
        need = [c for c in focus if got[c] < add[c]]
        if lay_cfg.copy_paste and need:
            donor_idx = np.flatnonzero(has[:, [focus.index(c) for c in need]].any(1))
            donor_idx = donor_idx[donor_idx != i]
            if len(donor_idx):
                picks = rng.choice(donor_idx, size=min(8, len(donor_idx)), replace=False)
                layout = copy_paste(layout, [train.layout(int(d)) for d in picks], rng, lay_cfg.copy_paste,
                                    classes=[codes[c] for c in need], max_overlap=lay_cfg.max_overlap)
        item, layout = _item(train, i, layout, need)
        got.update(item["objects" if unit == "objects" else "pixels"])
        out.append((item, layout))
    return out


def plan_classification(train: TrainingLayouts, add: dict[str, int], lay_cfg, max_samples: int, seed: int) -> list[tuple[dict, Layout]]:
    """add[c] images of each class c, each from a training sample of that class with new flips/warps."""
    rng = np.random.default_rng(seed)
    total = sum(add.values())
    if total > max_samples:  # scale every class down alike, rounding so the total is max_samples
        scaled = {c: n * max_samples / total for c, n in add.items()}
        add = {c: int(np.floor(v)) for c, v in scaled.items()}
        for c in sorted(scaled, key=lambda c: scaled[c] - add[c], reverse=True)[: max_samples - sum(add.values())]:
            add[c] += 1
    labels = np.array([str(x) for x in train.labels])
    out = []
    for c, n in add.items():
        of_class = np.flatnonzero(labels == c)
        if n and not len(of_class):
            raise ValueError(f"plan expects training samples of class {c!r} to start from, but there are none")
        sources = _cycle(of_class, rng)
        for _ in range(n):
            i = int(next(sources))
            out.append(_item(train, i, _new_layout(train, i, lay_cfg, rng), [c], label=c))
    return out


def sample_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of draw `attempt` of planned sample `index`: independent of batching and processes."""
    return int(np.random.SeedSequence([seed, index, attempt]).generate_state(1, dtype=np.uint32)[0])


def make_plan(train: TrainingLayouts, cfg, n_samples: int, lay_cfg, seed: int) -> tuple[dict, list[tuple[dict, Layout]]]:
    """(summary, [(item, layout), ...]): the plan's counts and one entry per synthetic sample."""
    unit = unit_of(train, cfg.unit)
    real = real_counts(train, unit)
    if cfg.mode == "replay":
        entries = plan_replay(train, n_samples, seed)
        add = None
    else:
        add = additions(real, cfg.mode, cfg.classes, cfg.factor, cfg.counts)
        if not any(add.values()):
            raise ValueError(f"plan {cfg.mode}: every class already meets the target ({real}); nothing to generate")
        entries = (plan_classification(train, add, lay_cfg, cfg.max_samples, seed) if unit == "images"
                   else plan_segmentation(train, add, unit, lay_cfg, cfg.max_samples, seed))
    planned: Counter = Counter()
    for item, _ in entries:
        if unit == "images":
            planned[str(item["label"])] += 1
        else:
            planned.update(item["objects" if unit == "objects" else "pixels"])
    for k, (item, _) in enumerate(entries):
        item.update(id=f"syn_{k:06d}", index=k)
    planned = {c: int(planned.get(c, 0)) for c in real}
    summary = {
        "mode": cfg.mode, "unit": unit, "seed": seed, "n_samples": len(entries),
        "real": real, "wanted": add, "planned": planned,
        "combined": {c: real[c] + planned[c] for c in real},
        "shortfall": None if add is None else {c: add[c] - planned[c] for c in real if planned[c] < add[c]},
    }
    return summary, entries

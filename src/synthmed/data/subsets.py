"""Nested real-data fractions of a prepared training split, by patient, for low-data studies.

A fraction keeps whole patients (slides, subjects): patients are put in one seeded order and each
fraction takes the shortest prefix holding at least that share of the training samples, so the
5% subset lies inside the 10% one, which lies inside the 25% one, and no patient is split.
`write_subset` writes a fraction as a prepared data set of its own (train rows filtered; images,
validation and test linked, not copied), so every command (`train controlnet`, `generate`) runs on
it unchanged and records its ids: a ControlNet trained on a fraction never saw the rest.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

from synthmed.core.io import SynthmedError, atomic_dir, load_png, read_json, write_json
from synthmed.data.metadata import read_metadata, write_metadata


def nested_fractions(rows: list[dict], fractions: list[float], seed: int) -> dict[float, list[str]]:
    """fraction -> the ids of its subset (whole patients, nested: a smaller fraction's ids are in every larger one)."""
    if not rows:
        raise ValueError("nested_fractions expects training rows, but got none")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"nested_fractions expects fractions in (0, 1], but got {bad}")
    by_patient: dict[str, list[str]] = {}
    for r in rows:
        by_patient.setdefault(str(r.get("patient_id") or r["id"]), []).append(r["id"])
    patients = sorted(by_patient)
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    cumulative = np.cumsum([len(by_patient[p]) for p in order])
    out = {}
    for f in sorted(set(fractions)):
        k = int(np.searchsorted(cumulative, math.ceil(f * len(rows) - 1e-9))) + 1  # patients needed to reach f
        out[f] = [i for p in order[:k] for i in by_patient[p]]
    return out


def write_subset(data: Path, ids: list[str], out: Path, fraction: float) -> Path:
    """A prepared data set whose train split is `ids` of `data`'s (validation/test/unlabelled linked as they are)."""
    data, out = Path(data), Path(out)
    card = read_json(data / "dataset.json")
    rows = read_metadata(data / "train" / "metadata.jsonl")
    keep = set(ids)
    missing = keep - {r["id"] for r in rows}
    if missing:
        raise SynthmedError(f"{data / 'train' / 'metadata.jsonl'}: subset ids not in the train split ({sorted(missing)[:3]})")
    sub = [r for r in rows if r["id"] in keep]
    with atomic_dir(out) as tmp:
        (tmp / "train").mkdir()
        for child in (data / "train").iterdir():
            if child.is_dir():
                os.symlink(child.resolve(), tmp / "train" / child.name)
        write_metadata(tmp / "train" / "metadata.jsonl", sub)
        for split in card.get("splits", {}):
            if split != "train":
                os.symlink((data / split).resolve(), tmp / split)
        card = dict(card)
        card["splits"] = dict(card["splits"])
        card["splits"]["train"] = _train_counts(data / "train", sub, card.get("classes") or [])
        card["subset_of"] = {"data": str(data.resolve()), "fraction": fraction, "n": len(sub), "n_full": len(rows),
                             "by": "patient", "fingerprint": card.get("fingerprint")}
        write_json(tmp / "dataset.json", card)
    return out


def _train_counts(folder: Path, rows: list[dict], classes: list[str]) -> dict:
    """The card's per-split counts for the subset's rows (as `prepare` writes them)."""
    from synthmed.data.prepared import _instance_classes

    labels, pixels, objects = Counter(), Counter(), Counter()
    masked = all("mask" in r for r in rows)
    for r in rows:
        if r.get("label") is not None:
            labels[str(r["label"])] += 1
        if masked:
            mask = load_png(folder / r["mask"])
            codes, px = np.unique(mask, return_counts=True)
            pixels.update({int(c): int(n) for c, n in zip(codes, px)})
            if "instance_mask" in r:
                objects.update(_instance_classes(load_png(folder / r["instance_mask"]), mask))
    names = ["background", *classes]
    return {
        "n": len(rows),
        "patients": sorted({str(r.get("patient_id")) for r in rows}),
        "labels_per_class": dict(sorted(labels.items())) or None,
        "objects_per_class": {c: objects.get(k, 0) for k, c in enumerate(classes, 1)} if objects else None,
        "pixels_per_class": {c: pixels.get(k, 0) for k, c in enumerate(names)} if masked else None,
    }


def outside_patients(rows: list[dict], ids: list[str]) -> list[int]:
    """Indices of the rows whose patient has no sample in `ids` (whole patients outside a subset)."""
    patient = lambda r: str(r.get("patient_id") or r["id"])  # noqa: E731
    inside = {patient(r) for r in rows if r["id"] in set(ids)}
    return [i for i, r in enumerate(rows) if patient(r) not in inside]


def select_to_targets(counts: np.ndarray, targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n row indices of `counts` (N, K: per-sample amount of each class) chosen to meet `targets` (K,), rarest class first.

    Classes are served in order of how little of them the candidates hold: for each, the samples holding most
    of it are taken until its target is met (counting what earlier picks already brought) or none holds any;
    then the rest of the n come in a seeded random order. Ties go in that seeded order too. Fewer than n
    candidates: all of them."""
    counts = np.asarray(counts, dtype=np.float64)
    targets = np.maximum(np.asarray(targets, dtype=np.float64), 0)
    if counts.ndim != 2 or counts.shape[1] != len(targets):
        raise ValueError(f"select_to_targets expects counts (N, {len(targets)}), but got {counts.shape}")
    n = min(n, len(counts))
    order = np.random.default_rng(seed).permutation(len(counts))
    counts, left = counts[order], targets.copy()
    free = np.ones(len(counts), bool)
    picked: list[int] = []
    for k in np.argsort(counts.sum(0), kind="stable"):  # the scarcest class first
        while left[k] > 0 and len(picked) < n:
            j = int(np.argmax(np.where(free, counts[:, k], -1.0)))  # the first of equals in the seeded order
            if not free[j] or counts[j, k] <= 0:
                break
            picked.append(j)
            free[j] = False
            left = np.maximum(left - counts[j], 0)
    picked += [int(j) for j in np.flatnonzero(free)[: n - len(picked)]]
    return np.sort(order[picked])

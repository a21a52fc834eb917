"""Downstream utility study cells: does synthetic data make a model better?

A study is a grid of cells (real-data fraction x arm x seed). Each cell trains one MONAI model
(evaluation/downstream.py) and writes CELLS/<fraction>/<arm>/seed<k>/result.json when it
finishes; a re-run skips finished cells, and a cell that crashes writes error.json beside it and
the others go on (a re-run tries it again). `aggregate` summarises whatever has finished: mean and
95% CI over seeds per (fraction, arm), and paired comparisons between arms (same seed, same subset).

Hygiene: fractions are nested subsets of the labelled train split by patient; validation picks the
early-stopping point, test is scored once per cell; a synthetic set may train an arm only if its
every sample derives from that arm's real subset and its model trained on no more than that subset.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import numpy as np

from synthmed.config import DownstreamConfig
from synthmed.core.io import SynthmedError, read_json, read_jsonl, write_json
from synthmed.core.progress import task

SYNTHETIC_ARMS = ("real+synthetic", "synthetic-only", "real+synthetic+classic")


def fraction_key(f: float) -> str:
    """'f0.10': a fraction's folder and results key."""
    return f"f{f:.2f}"


class RealData:
    """The real splits of a study, loaded once, with task-specific targets."""

    def __init__(self, data: Path, cfg: DownstreamConfig, card: dict):
        from synthmed.data.prepared import load_split

        self.root = data
        has_masks = all("mask" in r for r in read_jsonl(data / "train" / "metadata.jsonl"))
        self.task = cfg.task if cfg.task != "auto" else ("segmentation" if has_masks else "classification")
        seg = self.task == "segmentation"
        self.field, self.label_map = cfg.label_field, cfg.label_map or {}
        self.train, self.val, self.test = (load_split(data, s, need_masks=seg) for s in ("train", "validation", "test"))
        if seg:
            self.classes = list(card.get("classes") or [])
        else:
            rows = self.train.rows + self.val.rows + self.test.rows
            missing = next((r["id"] for r in rows if self.target_of(r) is None), None)
            if missing is not None:
                raise SynthmedError(f"{data}: classification needs a {self.field!r} on every sample; {missing} has none")
            # every split's labels: a class the training split lacks still counts (recall 0), it is not dropped
            self.classes = sorted({self.target_of(r) for r in rows})
        self.held_out = set(self.val.ids) | set(self.test.ids)
        self.absent_from_train = [c for c in self.classes if c not in {self.target_of(r) for r in self.train.rows}] if not seg else []
        self.index = {sid: i for i, sid in enumerate(self.train.ids)}
        self.rare = cfg.rare_class or self._rarest()
        if self.rare not in self.classes:
            raise SynthmedError(f"{data}: rare_class {self.rare!r} is not one of {self.classes}")
        self.positive = None
        if not seg and len(self.classes) == 2:  # the class a binary task's AUC and sensitivity are about
            self.positive = cfg.positive_class or self.rare
            if self.positive not in self.classes:
                raise SynthmedError(f"{data}: positive_class {self.positive!r} is not one of {self.classes}")

    def target_of(self, row: dict) -> str | None:
        """A row's classification target: its label_field value, through label_map."""
        from synthmed.data.prepared import label_target

        return label_target(row, self.field, self.label_map)

    def targets(self, split, where: str):
        """Masks (N, H, W) or label codes (N,) of a split."""
        if self.task == "segmentation":
            return split.masks
        try:
            return np.array([self.classes.index(self.target_of(r)) for r in split.rows])
        except ValueError:
            raise SynthmedError(f"{where}: a {self.field!r} outside the classes {self.classes}") from None

    def _rarest(self) -> str:
        if self.task == "segmentation":
            counts = [(int((self.train.masks == k).sum()), c) for k, c in enumerate(self.classes, 1)]
        else:
            labels = [self.target_of(r) for r in self.train.rows]
            counts = [(labels.count(c), c) for c in self.classes if c in labels]
        return min(counts)[1]

    def pool(self, ids: list[str]):
        from synthmed.evaluation.downstream import Pool

        idx = np.array([self.index[i] for i in ids])
        return Pool(self.train.images[idx], self.targets(self.train, str(self.root))[idx])

    def synthetic_pool(self, path: Path, f: float, allowed: set[str], cfg: DownstreamConfig):
        """A synthetic set as a training pool for fraction f, refused if it leaks data the arm does not have."""
        from synthmed.data.prepared import load_split
        from synthmed.evaluation.downstream import Pool, leakage

        meta = path / "train" / "metadata.jsonl"
        rows = read_jsonl(meta)
        model = (rows[0].get("provenance") or {}).get("model") if rows else None
        record = Path(model) / "training.json" if model else None
        train_ids = read_json(record).get("train_ids") if record is not None and record.is_file() else None
        why = leakage(rows, train_ids, allowed, self.held_out)
        if why:
            raise SynthmedError(f"{meta}: refused for the {f:.0%} fraction: {why}")
        syn = load_split(path, "train", need_masks=self.task == "segmentation")
        keep = np.arange(len(syn))
        if cfg.synthetic_count is not None and cfg.synthetic_count < len(syn):
            keep = np.sort(np.random.default_rng(cfg.subset_seed).permutation(len(syn))[: cfg.synthetic_count])
        return Pool(syn.images[keep], self.targets(syn, str(meta))[keep])


def run_cell(folder: Path, real: RealData, f: float, ids: list[str], arm: str, seed: int, syn_pool, cfg: DownstreamConfig, label: str) -> dict | None:
    """Train and score one cell unless it has finished; a crash is written to error.json, not raised."""
    from synthmed.evaluation import downstream as ds
    from synthmed.evaluation.downstream_metrics import classification_scores, segmentation_scores

    done = folder / "result.json"
    if done.is_file():
        return read_json(done)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        pools, classic = ds.arm_pools(arm, real.pool(ids), syn_pool)
        val = ds.Pool(real.val.images, real.targets(real.val, str(real.root)))
        settings = ds.TrainSettings(cfg.training.steps, cfg.eval_every, cfg.patience, cfg.training.batch_size, cfg.training.lr, cfg.mix, cfg.arch)
        with task(label, cfg.training.steps) as update:
            model, record = ds.train_cell(real.task, pools, classic, val, len(real.classes), settings, seed, update)
        pred = ds.predict(real.task, model, real.test.images)
        truth = real.targets(real.test, str(real.root))
        scores = segmentation_scores(pred, truth, real.classes) if real.task == "segmentation" else classification_scores(pred, truth, real.classes, positive=real.positive)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001  (one cell's failure must not stop the study)
        write_json(folder / "error.json", {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        print(f"{label}: failed ({type(exc).__name__}: {exc}); the other cells go on", flush=True)
        return None
    result = {"fraction": f, "arm": arm, "seed": seed, "task": real.task, "n_real": 0 if arm == "synthetic-only" else len(ids),
              "n_synthetic": len(syn_pool) if syn_pool is not None and "synthetic" in arm else 0, "classic_augmentation": classic,
              "test": scores, "training": record, "seconds": round(time.time() - started, 1)}
    write_json(done, result)
    (folder / "error.json").unlink(missing_ok=True)
    return result


def headline_metrics(task: str, rare: str, binary: bool = False) -> dict[str, tuple]:
    """name -> path into a cell's test scores, for the summary tables and comparisons."""
    if task == "segmentation":
        return {"dice": ("dice",), "iou": ("iou",), "hd95": ("hd95",), f"dice {rare}": ("per_class", rare, "dice"), f"iou {rare}": ("per_class", rare, "iou")}
    sens = {"sensitivity_at_90_specificity": ("sensitivity_at_90_specificity",)} if binary else {}
    return {"auc": ("auc",), **sens, "balanced_accuracy": ("balanced_accuracy",), "accuracy": ("accuracy",), "macro_f1": ("macro_f1",),
            f"recall {rare}": ("per_class", rare, "recall")}


def _get(d: dict, path: tuple):
    for k in path:
        d = (d or {}).get(k)
    return d


def aggregate(out: Path, real: RealData, cfg: DownstreamConfig, subsets: dict, sources: dict) -> dict:
    """Finished cells -> mean and 95% CI over seeds per (fraction, arm), and paired comparisons with `real`."""
    from synthmed.evaluation.downstream_metrics import over_seeds, paired_comparison

    metrics = headline_metrics(real.task, real.rare, real.positive is not None)
    per_class_metric = "dice" if real.task == "segmentation" else "recall"
    cells, errors = _finished_cells(out, cfg)
    summary, comparisons = {}, {}
    for f in cfg.fractions:
        fk = fraction_key(f)
        summary[fk] = {}
        for arm in cfg.arms:
            runs = [cells.get((f, arm, s)) for s in cfg.seeds]
            got = [r for r in runs if r]
            summary[fk][arm] = {
                "n_seeds": len(got),
                **{m: over_seeds([_get(r["test"], p) for r in got], bounds=None if m.startswith("hd95") else (0.0, 1.0)) for m, p in metrics.items()},
                "per_class": {c: over_seeds([_get(r["test"], ("per_class", c, per_class_metric)) for r in got], bounds=(0.0, 1.0)) for c in real.classes},
                "curves": [r["training"]["curve"] for r in got],
            }
        comparisons[fk] = {}
        for arm in cfg.arms:
            if arm == "real" or "real" not in cfg.arms:
                continue
            pairs = [(cells.get((f, "real", s)), cells.get((f, arm, s))) for s in cfg.seeds]
            comparisons[fk][f"{arm} vs real"] = {m: paired_comparison([_get(a["test"], p) if a and b else None for a, b in pairs],
                                                                        [_get(b["test"], p) if a and b else None for a, b in pairs])
                                                 for m, p in metrics.items()}
    return {
        "task": real.task,
        "classes": real.classes,
        "rare_class": real.rare,
        "label_field": real.field if real.task == "classification" else None,
        "label_map": real.label_map or None,
        "positive_class": real.positive,
        "classes_absent_from_train": real.absent_from_train,
        "metrics": list(metrics),
        "per_class_metric": per_class_metric,
        "fractions": {fraction_key(f): {"fraction": f, "n_real": len(subsets[f]), "n_patients": len({real.train.rows[real.index[i]].get("patient_id") for i in subsets[f]}),
                                        "synthetic": sources.get(f)} for f in cfg.fractions},
        "arms": cfg.arms,
        "seeds": cfg.seeds,
        "n_cells": len(cfg.fractions) * len(cfg.arms) * len(cfg.seeds),
        "n_finished": len(cells),
        "errors": errors,
        "summary": summary,
        "comparisons": comparisons,
        "low_data_vs_full": _low_vs_full(summary, cfg, metrics),
        "n_real_validation": len(real.val),
        "n_real_test": len(real.test),
        "protocol": {"subsets": f"nested by patient, seed {cfg.subset_seed}", "early_stopping": f"real validation split every {cfg.eval_every} steps, patience {cfg.patience}, best weights kept",
                     "test": "real test split, scored once per cell", "ci": "mean over seeds with a t 95% interval", "paired": "same seed and subset: paired t-test (primary) and Wilcoxon"},
    }


def _finished_cells(out: Path, cfg: DownstreamConfig) -> tuple[dict, list]:
    """{(fraction, arm, seed): result} of the finished cells, and the failed cells' errors."""
    cells, errors = {}, []
    for f in cfg.fractions:
        for arm in cfg.arms:
            for seed in cfg.seeds:
                folder = out / "cells" / fraction_key(f) / arm / f"seed{seed}"
                if (folder / "result.json").is_file():
                    cells[(f, arm, seed)] = read_json(folder / "result.json")
                elif (folder / "error.json").is_file():
                    errors.append({"fraction": f, "arm": arm, "seed": seed, "error": read_json(folder / "error.json")["error"]})
    return cells, errors


def _low_vs_full(summary: dict, cfg: DownstreamConfig, metrics: dict) -> dict | None:
    """The published pattern's question: the lowest fraction with synthetic data against all real data alone."""
    lo, hi = fraction_key(min(cfg.fractions)), fraction_key(max(cfg.fractions))
    if lo == hi or "real" not in cfg.arms:
        return None
    out = {}
    for arm in cfg.arms:
        if "synthetic" in arm:
            out[f"{lo} {arm} / {hi} real"] = {m: _ratio(summary[lo][arm][m]["mean"], summary[hi]["real"][m]["mean"]) for m in metrics if not m.startswith("hd95")}
    out[f"{lo} real / {hi} real"] = {m: _ratio(summary[lo]["real"][m]["mean"], summary[hi]["real"][m]["mean"]) for m in metrics if not m.startswith("hd95")}
    return out


def _ratio(a, b):
    return None if a is None or not b else float(a) / float(b)

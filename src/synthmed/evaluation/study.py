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
import torch

from synthmed.config import DownstreamConfig
from synthmed.core.device import device
from synthmed.core.io import SynthmedError, json_hash, read_json, write_json
from synthmed.data.arrays import READ_ROWS, Rows, code_counts, take_rows
from synthmed.data.metadata import read_metadata
from synthmed.core.progress import note, task

SYNTHETIC_ARMS = ("real+synthetic", "synthetic-only", "real+classic+synthetic", "synthetic-pretrain")
CEILING_ARMS = ("real+heldout", "real+classic+heldout", "real+oracle", "real+classic+oracle")


def fraction_key(f: float) -> str:
    """'f0.10': a fraction's folder and results key."""
    return f"f{f:.2f}"


class RealData:
    """The real splits of a study, loaded once, with task-specific targets."""

    def __init__(self, data: Path, cfg: DownstreamConfig, card: dict):
        from synthmed.data.prepared import load_split

        self.root = data
        has_masks = all("mask" in r for r in read_metadata(data / "train" / "metadata.jsonl"))
        self.task = cfg.task if cfg.task != "auto" else ("segmentation" if has_masks else "classification")
        seg = self.task == "segmentation"
        self.field, self.label_map = cfg.label_field, cfg.label_map or {}
        self.train, self.val, self.test = (load_split(data, s, need_masks=seg) for s in ("train", "validation", "test"))
        self.lut = None
        if seg:
            self.classes = self._merged_classes(list(card.get("classes") or []), cfg.mask_classes or {}, data)
        else:
            rows = self.train.rows + self.val.rows + self.test.rows
            missing = next((r["id"] for r in rows if self.target_of(r) is None), None)
            if missing is not None:
                raise SynthmedError(f"{data}: classification needs a {self.field!r} on every sample; {missing} has none")
            # every split's labels: a class the training split lacks still counts (recall 0), it is not dropped
            self.classes = sorted({self.target_of(r) for r in rows})
        # views of the splits' targets (read by batches); mask codes checked once, here
        self.train_targets, self.val_targets, self.test_targets = (self.targets(s, str(data)) for s in (self.train, self.val, self.test))
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

    def _merged_classes(self, names: list[str], merge: dict[str, str], data: Path) -> list[str]:
        """The classes the model learns, and (self.lut) the mask code of each card class among them."""
        unknown = sorted(set(merge) - set(names))
        if unknown:
            raise SynthmedError(f"{data}: mask_classes names {unknown}, which the data set does not have (classes: {', '.join(names)})")
        if not merge:
            return names
        merged = list(dict.fromkeys(merge.get(n, n) for n in names))
        self.lut = np.array([0] + [merged.index(merge.get(n, n)) + 1 for n in names], np.uint8)
        return merged

    def masks_of(self, masks, where: str) -> Rows:
        """Mask codes of the card's classes as codes of the classes the model learns (mask_classes), as a view
        that reads (and maps) rows when a batch is drawn; the codes are checked here, a chunk at a time."""
        if self.lut is not None:
            top = max((int(np.asarray(masks[s : s + READ_ROWS]).max()) for s in range(0, len(masks), READ_ROWS)), default=0)
            if top >= len(self.lut):
                raise SynthmedError(f"{where}: mask code {top} is beyond the data set's {len(self.lut) - 1} classes")
        return Rows(masks, lut=self.lut)

    def target_of(self, row: dict) -> str | None:
        """A row's classification target: its label_field value, through label_map."""
        from synthmed.data.prepared import label_target

        return label_target(row, self.field, self.label_map)

    def targets(self, split, where: str):
        """Masks (N, H, W) or label codes (N,) of a split."""
        if self.task == "segmentation":
            return self.masks_of(split.masks, where)
        try:
            return np.array([self.classes.index(self.target_of(r)) for r in split.rows])
        except ValueError:
            raise SynthmedError(f"{where}: a {self.field!r} outside the classes {self.classes}") from None

    def _rarest(self) -> str:
        if self.task == "segmentation":
            pixels = code_counts(self.train_targets, len(self.classes) + 1)
            counts = [(int(pixels[k]), c) for k, c in enumerate(self.classes, 1)]
        else:
            labels = [self.target_of(r) for r in self.train.rows]
            counts = [(labels.count(c), c) for c in self.classes if c in labels]
        return min(counts)[1]

    def pool(self, ids: list[str]):
        from synthmed.evaluation.downstream import Pool

        idx = np.array([self.index[i] for i in ids], dtype=np.int64)
        return Pool(Rows(self.train.images, idx), take_rows(self.train_targets, idx))

    def composition(self, pool) -> np.ndarray:
        """Per-sample class amounts (N, K): pixels of each foreground class, or a one-hot label."""
        k = len(self.classes)
        if self.task == "segmentation":
            return np.stack([np.bincount(m.ravel(), minlength=k + 1)[1 : k + 1] for m in pool.targets]).reshape(-1, k)
        return np.eye(k)[np.asarray(pool.targets)]

    def ceiling_targets(self, ids: list[str], synthetic) -> tuple[np.ndarray, int]:
        """(class targets, sample count) a ceiling arm is chosen to: the synthetic pool's own composition and
        size where there is one, else the balance deficits of the fraction (every class up to the largest)."""
        if synthetic is not None and len(synthetic):
            return self.composition(synthetic).sum(0), len(synthetic)
        have = self.composition(self.pool(ids)).sum(0)
        return have.max() - have, len(ids)

    def heldout_pool(self, ids: list[str], synthetic, seed: int):
        """Real training samples of patients wholly outside the fraction, chosen to the synthetic plan's class
        targets as far as they allow (None when no patient is left, e.g. at 100%), and their ids."""
        from synthmed.data.subsets import outside_patients, select_to_targets
        from synthmed.evaluation.downstream import Pool

        candidates = outside_patients(self.train.rows, ids)
        if not candidates:
            return None, []
        targets, n = self.ceiling_targets(ids, synthetic)
        everyone = Pool(Rows(self.train.images, candidates), take_rows(self.train_targets, candidates))
        pick = select_to_targets(self.composition(everyone), targets, n, seed)
        chosen = [self.train.rows[candidates[i]]["id"] for i in pick]
        return Pool(everyone.images.subset(pick), take_rows(everyone.targets, pick)), chosen

    def oracle_pool(self, card: dict, ids: list[str], synthetic, seed: int, candidates_per_sample: int = 4):
        """Fresh samples of a generated data set from slides/patients no split holds, chosen to the same class
        targets (None for data that is not generated), and their ids."""
        from synthmed.data.phantoms.oracle import fresh_samples, is_generated
        from synthmed.data.prepared import rgb_image
        from synthmed.data.subsets import select_to_targets
        from synthmed.evaluation.downstream import Pool

        if not is_generated(card):
            return None, []
        targets, n = self.ceiling_targets(ids, synthetic)
        samples = fresh_samples(card, n * candidates_per_sample)
        images = np.stack([rgb_image(s.image) for s in samples])
        if images.shape[1:3] != self.train.images.shape[1:3]:
            raise SynthmedError(f"{self.root}: fresh phantom samples are {images.shape[1:3]}, the prepared set {self.train.images.shape[1:3]}")
        if self.task == "segmentation":
            labels = self.masks_of(np.stack([s.mask for s in samples]), "fresh phantom samples")
        else:
            rows = [{"id": s.id, "label": s.label, **s.extra} for s in samples]
            labels = np.array([self.classes.index(self.target_of(r)) for r in rows])
        everyone = Pool(images, labels)
        pick = select_to_targets(self.composition(everyone), targets, n, seed)
        return Pool(images[pick], labels[pick]), [samples[i].id for i in pick]

    def synthetic_pool(self, path: Path, f: float, allowed: set[str], cfg: DownstreamConfig):
        """A synthetic set as a training pool for fraction f, refused if it leaks data the arm does not have."""
        from synthmed.data.prepared import load_split
        from synthmed.evaluation.downstream import Pool, leakage

        meta = path / "train" / "metadata.jsonl"
        rows = read_metadata(meta)
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
        return Pool(Rows(syn.images, keep), take_rows(self.targets(syn, str(meta)), keep))

    def trusted_pool(self, pool, path: Path, allowed: set[str]) -> tuple:
        """The synthetic pool with every pixel where the generation filter's segmenter disagrees with the sample's
        mask set to IGNORE (left out of the loss: a label is trusted only where the image carries it), and what
        was kept. The judge was trained on the generate run's real data; refused unless that is within `allowed`."""
        from synthmed.data.prepared import read_card
        from synthmed.evaluation.downstream import IGNORE, Pool
        from synthmed.models.tasknets import build_segmenter, load_weights, predict

        weights, card = path / "judges" / "segmenter.safetensors", read_card(path)
        if self.task != "segmentation":
            raise SynthmedError(f"{path}: synthetic_trust judge is for segmentation (per-pixel labels), not {self.task}")
        if not weights.is_file():
            raise SynthmedError(f"{path}: synthetic_trust judge needs the filter's segmenter in {weights} (generate with filter.by dice or both)")
        source = Path(card.get("real_data") or "")
        meta = source / "train" / "metadata.jsonl"
        if not meta.is_file():
            raise SynthmedError(f"{path}: synthetic_trust judge: the judge's training data {source} is not readable, so it cannot be checked against the fraction")
        outside = sorted({r["id"] for r in read_metadata(meta)} - allowed)
        if outside:
            raise SynthmedError(f"{path}: synthetic_trust judge was trained on {len(outside)} samples outside this fraction's subset (e.g. {outside[0]})")
        judge = load_weights(build_segmenter(len(card.get("classes") or [])), weights)
        n_codes = len(self.classes) + 1
        targets, total = np.empty((len(pool), *pool.targets.shape[1:]), np.uint8), np.zeros(n_codes, np.int64)
        for s in range(0, len(pool), READ_ROWS):
            mask = np.asarray(pool.targets[s : s + READ_ROWS])  # codes of the classes learnt (mask_classes applied)
            pred = predict(judge, np.asarray(pool.images[s : s + READ_ROWS]))  # codes of the card's classes
            targets[s : s + READ_ROWS] = np.where((pred if self.lut is None else self.lut[pred]) == mask, mask, IGNORE)
            total += code_counts(mask, n_codes)
        trusted = code_counts(targets, n_codes)  # IGNORE is beyond the codes counted
        info = {"by": "judge", "judge": str(weights.resolve()), "trusted_pixels": round(float(trusted.sum() / max(total.sum(), 1)), 4),
                "trusted_per_class": {c: round(float(trusted[k] / total[k]), 4) if total[k] else None
                                      for k, c in enumerate(["background", *self.classes])}}
        return Pool(pool.images, targets), info


def cell_settings(cfg: DownstreamConfig, arm: str, basis: dict) -> dict:
    """What a cell's numbers depend on besides its seed: the real data and the fraction's subset (`basis`: data,
    subset), the training recipe and targets, and for an arm with an extra pool that pool (`basis[source]`) and how
    it is mixed in. Settings that only shape the grid (fractions, arms, seeds, workers) or the report are not in it."""
    from synthmed.evaluation.downstream import arm_of

    spec = arm_of(arm)
    keys = ("task", "training", "eval_every", "patience", "arch", "label_field", "label_map", "positive_class", "mask_classes")
    settings = {"data": basis["data"], "subset": basis["subset"], **cfg.model_dump(include=set(keys))}
    if cfg.compile:  # other rounding; absent when off, so cells trained before the setting existed stay valid
        settings["compile"] = True
    if spec.pretrain:
        settings["pretrain_steps"] = cfg.pretrain_steps
    if spec.extra:
        settings[spec.extra] = basis.get(spec.extra)
        if spec.real and not spec.pretrain:
            settings["mix"] = cfg.mix if spec.extra == "synthetic" or cfg.ceiling_mix == "mix" else cfg.ceiling_mix
        if spec.extra == "synthetic":
            settings |= {"synthetic_count": cfg.synthetic_count, "synthetic_trust": cfg.synthetic_trust}
    return settings


def still_to_run(cells: list[tuple[Path, dict]]) -> list[int]:
    """Indexes of the cells (folder, settings) that must train: no result.json yet, or one trained with other
    settings, which is moved aside to result.stale.json with a note naming what changed (a resumed study never
    mixes cells of different settings). A result written before cells recorded their settings is kept."""
    todo = []
    for i, (folder, settings) in enumerate(cells):
        done = folder / "result.json"
        if not done.is_file():
            todo.append(i)
            continue
        old = read_json(done).get("settings")
        if old is None or json_hash(old) == json_hash(settings):
            continue
        changed = sorted(k for k in settings.keys() | old.keys() if json_hash(settings.get(k)) != json_hash(old.get(k)))
        done.replace(folder / "result.stale.json")
        note(f"{folder}: finished with other settings (changed: {', '.join(changed)}); kept as result.stale.json and trained again")
        todo.append(i)
    return todo


def run_cell(folder: Path, real: RealData, f: float, ids: list[str], arm: str, seed: int, extras, cfg: DownstreamConfig, label: str,
             settings: dict) -> dict | None:
    """Train and score one cell unless it has finished; a crash is written to error.json, not raised.

    `extras` maps a source (synthetic, heldout, oracle) to its pool (a bare pool: the synthetic one); `settings`
    (cell_settings) is recorded in result.json, so that a resumed study can tell a cell trained otherwise.
    With several `mix` values, an arm that mixes two pools trains once per value and keeps the one with
    the best real validation score (never the test score). The mix values tried are the cell's settings' (with
    mix_chosen_on first_seed, a later seed's settings hold its first seed's choice: see `chosen_mix`)."""
    from synthmed.evaluation import downstream as ds
    from synthmed.evaluation.downstream_metrics import classification_scores, segmentation_scores

    done = folder / "result.json"
    if done.is_file():
        return read_json(done)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    extras = extras if isinstance(extras, dict) else {"synthetic": extras}
    spec = ds.arm_of(arm)
    extra = extras.get(spec.extra) if spec.extra else None
    try:
        pools, classic = ds.arm_pools(arm, real.pool(ids), extras)
        val = ds.Pool(real.val.images, real.val_targets)
        mix_setting = settings.get("mix", cfg.mix)
        mixes = mix_setting if isinstance(mix_setting, list) else [mix_setting]
        weights = None
        if real.task == "segmentation" and cfg.training.class_weighting == "median_frequency":
            from synthmed.training.tasks import class_weights

            weights = class_weights(real.pool(ids).targets, len(real.classes))  # from the fraction's real subset: one weighting for every arm
        tried = []
        for mix in (mixes if len(pools) == 2 else [None]):
            recipe = ds.TrainSettings(cfg.training.steps, cfg.eval_every, cfg.patience, cfg.training.batch_size, cfg.training.lr,
                                        mix, cfg.arch, pretrain_steps=cfg.pretrain_steps, class_weights=weights, compile=cfg.compile)
            with task(label + (f", mix {mix}" if len(mixes) > 1 and len(pools) == 2 else ""), cfg.training.steps) as update:
                model, record = ds.train_cell(real.task, pools, classic, val, len(real.classes), recipe, seed, update, device=device(),
                                              pretrain=(extra if spec.extra else pools[0]) if spec.pretrain else None)
            tried.append((record["best_val_score"], mix, model, record))
        best = max(range(len(tried)), key=lambda i: tried[i][0])  # the first of equal scores
        _, mix, model, record = tried[best]
        if len(pools) == 2:
            record["mix"] = mix
            if len(tried) > 1:
                record["mix_chosen_on_validation"] = {str(m): float(v) for v, m, _, _ in tried}
            if "mix_chosen_on_seed" in settings:
                record["mix_chosen_on_seed"] = settings["mix_chosen_on_seed"]
        pred = ds.predict(real.task, model, real.test.images)
        truth = real.test_targets
        scores = segmentation_scores(pred, truth, real.classes) if real.task == "segmentation" else classification_scores(pred, truth, real.classes, positive=real.positive)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001  (one cell's failure must not stop the study)
        write_json(folder / "error.json", {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        print(f"{label}: failed ({type(exc).__name__}: {exc}); the other cells go on", flush=True)
        return None
    n_extra = len(extra) if extra is not None else 0
    result = {"fraction": f, "arm": arm, "seed": seed, "task": real.task, "n_real": 0 if not spec.real else len(ids),
              "extra": spec.extra, "n_extra": n_extra, "n_synthetic": n_extra if spec.extra == "synthetic" else 0,
              "classic_augmentation": classic, **({"synthetic_trust": cfg.synthetic_trust} if spec.extra == "synthetic" else {}), "test": scores, "training": record, "seconds": round(time.time() - started, 1),
              "threads": torch.get_num_threads(),  # a cell's numbers depend on its thread count in the last bits
              "settings": settings}
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


def seeds_of(cfg: DownstreamConfig, f: float, arm: str | None = None) -> list[int]:
    """The training seeds of an arm at a fraction: at the lowest fraction its `arm_seeds_at_lowest` where given, else
    `seeds_at_lowest` where given; else `seeds`. Without an arm: every seed some arm trains at that fraction, in order."""
    lowest = f == min(cfg.fractions)
    if arm is None:
        return list(dict.fromkeys(s for a in cfg.arms for s in seeds_of(cfg, f, a)))
    if lowest and arm in (cfg.arm_seeds_at_lowest or {}):
        return list(cfg.arm_seeds_at_lowest[arm])
    return list(cfg.seeds_at_lowest) if cfg.seeds_at_lowest and lowest else list(cfg.seeds)


def aggregate(out: Path, real: RealData, cfg: DownstreamConfig, subsets: dict, sources: dict, ceilings: dict | None = None) -> dict:
    """Finished cells -> mean and 95% CI over seeds per (fraction, arm); paired comparisons of every arm with
    its baseline (real+classic for the augmented arms, real otherwise), per metric and per class; synthetic
    utility (gain of synthetic / gain of the ceiling); and what one extra sample is worth in real samples."""
    from synthmed.evaluation.downstream import arm_of
    from synthmed.evaluation.downstream_metrics import over_seeds, paired_comparison

    metrics = headline_metrics(real.task, real.rare, real.positive is not None)
    per_class_metric = "dice" if real.task == "segmentation" else "recall"
    cells, errors = _finished_cells(out, cfg)
    summary, comparisons, utility = {}, {}, {}
    for f in cfg.fractions:
        fk, seeds = fraction_key(f), seeds_of(cfg, f)
        summary[fk] = {}
        for arm in cfg.arms:
            got = [r for r in (cells.get((f, arm, s)) for s in seeds_of(cfg, f, arm)) if r]
            summary[fk][arm] = {
                "n_seeds": len(got),
                **{m: over_seeds([_get(r["test"], p) for r in got], bounds=None if m.startswith("hd95") else (0.0, 1.0)) for m, p in metrics.items()},
                "per_class": {c: over_seeds([_get(r["test"], ("per_class", c, per_class_metric)) for r in got], bounds=(0.0, 1.0)) for c in real.classes},
                "curves": [r["training"]["curve"] for r in got],
                **({"confusion": _mean_confusion([r["test"].get("confusion") for r in got])} if real.task == "segmentation" else {}),
                "n_extra": max((r.get("n_extra", r.get("n_synthetic", 0)) for r in got), default=0),
            }
        comparisons[fk], utility[fk] = {}, {}
        # by seed over every seed of the fraction (None where the arm has no such seed): pairs are the seeds both arms share
        values = lambda arm, path: [_get(c["test"], path) if c else None for c in (cells.get((f, arm, s)) for s in seeds)]  # noqa: E731
        pairs_to_compare = [(arm, arm_of(arm).baseline) for arm in cfg.arms]
        if "synthetic-pretrain" in cfg.arms and "real-pretrain" in cfg.arms:
            pairs_to_compare.append(("synthetic-pretrain", "real-pretrain"))  # the same schedule: the synthetic data's own effect
        for arm, base in pairs_to_compare:
            if base is None or base not in cfg.arms:
                continue
            # paired_comparison drops the seeds where either arm has no value
            comparisons[fk][f"{arm} vs {base}"] = {
                **{m: paired_comparison(values(base, p), values(arm, p)) for m, p in metrics.items()},
                "per_class": {c: paired_comparison(values(base, ("per_class", c, per_class_metric)), values(arm, ("per_class", c, per_class_metric)))
                              for c in real.classes}}
        for syn in (a for a in cfg.arms if arm_of(a).extra == "synthetic" and arm_of(a).real):
            base = arm_of(syn).baseline
            for ceiling in (a for a in cfg.arms if arm_of(a).extra in ("heldout", "oracle") and arm_of(a).baseline == base):
                paths = {**metrics, **{f"{per_class_metric} {c}": ("per_class", c, per_class_metric) for c in real.classes}}
                utility[fk][f"{syn} / {ceiling}"] = {m: synthetic_utility(values(base, p), values(syn, p), values(ceiling, p), lower_is_better=m.startswith("hd95"))
                                                     for m, p in paths.items()}
    return {
        "task": real.task,
        "classes": real.classes,
        "rare_class": real.rare,
        "label_field": real.field if real.task == "classification" else None,
        "label_map": real.label_map or None,
        "positive_class": real.positive,
        "arch": cfg.arch if real.task == "classification" else "unet",
        "mask_classes": cfg.mask_classes if real.task == "segmentation" else None,
        "classes_absent_from_train": real.absent_from_train,
        "metrics": list(metrics),
        "per_class_metric": per_class_metric,
        "fractions": {fraction_key(f): {"fraction": f, "n_real": len(subsets[f]), "n_patients": len({real.train.rows[real.index[i]].get("patient_id") for i in subsets[f]}),
                                        "synthetic": sources.get(f), "seeds": seeds_of(cfg, f), **((ceilings or {}).get(f) or {})} for f in cfg.fractions},
        "arms": cfg.arms,
        "seeds": cfg.seeds,
        "n_cells": sum(len(seeds_of(cfg, f, arm)) for f in cfg.fractions for arm in cfg.arms),
        "n_finished": len(cells),
        "errors": errors,
        "summary": summary,
        "comparisons": comparisons,
        "headline": _headline(cfg),
        "synthetic_utility": utility,
        "worth_in_real_samples": _worth(summary, cfg, subsets, metrics),
        "low_data_vs_full": _low_vs_full(summary, cfg, metrics),
        "n_real_validation": len(real.val),
        "n_real_test": len(real.test),
        "protocol": {"subsets": f"nested by patient, seed {cfg.subset_seed}", "early_stopping": f"real validation split every {cfg.eval_every} steps, patience {cfg.patience}, best weights kept",
                     "test": "real test split, scored once per cell", "ci": "mean over seeds with a t 95% interval",
                     "paired": "same seed and subset: paired t-test (primary) and Wilcoxon; every arm against its baseline (real+classic for the augmented arms)",
                     "mix": _mix_protocol(cfg),
                     "ceilings": "heldout: real training samples of patients outside the fraction; oracle: fresh samples of the generated data set from "
                                 "slides/patients no split holds; both chosen to the synthetic set's class composition and size",
                     "utility": "mean gain of the synthetic arm over its baseline / mean gain of the ceiling arm over the same baseline, paired by seed; "
                                "95% percentile bootstrap over seeds"},
    }


def _mean_confusion(matrices: list) -> dict | None:
    """Where each true class's test pixels went, as shares of its row, averaged over seeds (None unless every
    cell has a confusion matrix: cells scored before it was recorded have none)."""
    if not matrices or any(m is None for m in matrices):
        return None
    rows = []
    for m in matrices:
        x = np.asarray(m["pixels"], dtype=np.float64)
        rows.append(x / np.maximum(x.sum(1, keepdims=True), 1))
    return {"classes": matrices[0]["classes"], "shares": np.round(np.mean(rows, 0), 4).tolist(), "rows": "true class", "columns": "predicted class"}


def _mix_protocol(cfg: DownstreamConfig) -> str:
    said = _mix_said(cfg, cfg.mix)
    if cfg.ceiling_mix == "mix":
        return said
    return f"synthetic arms: {said}; ceiling arms: {_mix_said(cfg, cfg.ceiling_mix)}"


def _mix_said(cfg: DownstreamConfig, mix) -> str:
    if not isinstance(mix, list):
        return f"{mix} of each mixed batch from the extra pool"
    if cfg.mix_chosen_on == "first_seed":
        return f"chosen on the real validation split among {mix} by the first seed's cell of each fraction and arm; the other seeds use its choice"
    return f"chosen per cell on the real validation split among {mix}"


def first_seed_of(cfg: DownstreamConfig, f: float, arm: str, settings: dict, seed: int) -> int | None:
    """The seed whose cell chooses this cell's mix (mix_chosen_on first_seed, a list of mixes, an arm that mixes
    pools, a later seed of the arm), or None: the cell chooses its own."""
    seeds = seeds_of(cfg, f, arm)
    if cfg.mix_chosen_on != "first_seed" or not isinstance(settings.get("mix"), list) or len(settings["mix"]) < 2 or seed == seeds[0]:
        return None
    return seeds[0]


def chosen_mix(first: Path, settings: dict, first_seed: int) -> dict | None:
    """A later seed's settings with the mix its first seed's cell (folder `first`, settings otherwise the same)
    chose on validation, or None while that cell has not finished."""
    done = first / "result.json"
    if not done.is_file():
        return None
    mix = (read_json(done).get("training") or {}).get("mix")
    return None if mix is None else {**settings, "mix": mix, "mix_chosen_on_seed": first_seed}


def _headline(cfg: DownstreamConfig) -> list[str]:
    """The comparisons a practitioner reads first: synthetic and the ceilings on top of classic augmentation."""
    wanted = ["real+classic+synthetic vs real+classic", "synthetic-pretrain vs real+classic", "synthetic-pretrain vs real-pretrain",
              "real-pretrain vs real+classic", "real+classic+oracle vs real+classic",
              "real+classic+heldout vs real+classic", "real+classic vs real"]
    return [w for w in wanted if w.split(" vs ")[0] in cfg.arms and w.split(" vs ")[1] in cfg.arms]


def synthetic_utility(base: list, synthetic: list, ceiling: list, lower_is_better: bool = False, n_boot: int = 2000, seed: int = 0) -> dict:
    """gain(synthetic) / gain(ceiling) over the same baseline, paired by seed, with a percentile bootstrap
    interval over seeds. None where the ceiling shows no gain (a ratio to nothing is not a utility)."""
    rows = [(b, s, c) for b, s, c in zip(base, synthetic, ceiling) if None not in (b, s, c) and np.isfinite([b, s, c]).all()]
    out = {"n": len(rows), "utility": None, "low": None, "high": None, "gain_synthetic": None, "gain_ceiling": None}
    if not rows:
        return out
    x = np.array(rows, dtype=np.float64)
    sign = -1.0 if lower_is_better else 1.0
    g_syn, g_ceil = sign * (x[:, 1] - x[:, 0]), sign * (x[:, 2] - x[:, 0])
    out.update(gain_synthetic=float(g_syn.mean()), gain_ceiling=float(g_ceil.mean()))
    if g_ceil.mean() <= 0:
        out["why_none"] = "the ceiling arm does not beat the baseline"
        return out
    out["utility"] = float(g_syn.mean() / g_ceil.mean())
    if len(rows) >= 2:
        idx = np.random.default_rng(seed).integers(0, len(rows), (n_boot, len(rows)))
        num, den = g_syn[idx].mean(1), g_ceil[idx].mean(1)
        ratios = num[den > 0] / den[den > 0]
        if len(ratios) >= n_boot // 2:
            out["low"], out["high"] = (float(v) for v in np.percentile(ratios, [2.5, 97.5]))
    return out


def _worth(summary: dict, cfg: DownstreamConfig, subsets: dict, metrics: dict) -> dict:
    """How many real samples one extra sample of an arm is worth: the arm's mean score placed on its baseline's
    curve over the fractions (linear in the number of real samples), minus the fraction's real count, per extra
    sample. Only where the score lies within the baseline's curve above the fraction (no extrapolation)."""
    from synthmed.evaluation.downstream import arm_of

    out = {}
    fracs = sorted(cfg.fractions)
    for f in fracs:
        fk = fraction_key(f)
        for arm in cfg.arms:
            spec = arm_of(arm)
            if spec.extra is None or not spec.real or spec.baseline not in cfg.arms or not summary[fk][arm]["n_extra"]:
                continue
            row = {}
            for m in (m for m in metrics if not m.startswith("hd95")):
                score = summary[fk][arm][m]["mean"]
                curve = [(len(subsets[g]), summary[fraction_key(g)][spec.baseline][m]["mean"]) for g in fracs if g >= f]
                if score is None or len(curve) < 2 or any(v is None for _, v in curve):
                    continue
                n_equiv = None
                for (n0, v0), (n1, v1) in zip(curve, curve[1:]):
                    if min(v0, v1) <= score <= max(v0, v1) and v1 != v0:
                        n_equiv = n0 + (score - v0) / (v1 - v0) * (n1 - n0)
                        break
                if n_equiv is not None:
                    row[m] = {"n_real_equivalent": float(n_equiv), "per_extra_sample": float((n_equiv - len(subsets[f])) / summary[fk][arm]["n_extra"])}
            if row:
                out.setdefault(fk, {})[arm] = row
    return out


def _finished_cells(out: Path, cfg: DownstreamConfig) -> tuple[dict, list]:
    """{(fraction, arm, seed): result} of the finished cells, and the failed cells' errors."""
    cells, errors = {}, []
    for f in cfg.fractions:
        for arm in cfg.arms:
            for seed in seeds_of(cfg, f, arm):
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

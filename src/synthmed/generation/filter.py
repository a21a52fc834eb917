"""The quality filter: judges trained on the real train split (segmenter Dice, classifier confidence), their thresholds, and the keep rule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from synthmed.config import GenerateConfig
from synthmed.core.io import SynthmedError, read_json, write_json
from synthmed.core.progress import task
from synthmed.models.tasknets import build_classifier, build_segmenter, load_weights, save_weights

# The filter's judges train with this offset on the seed, so that `evaluate`'s segmenter (same recipe,
# seed 0) is a different model: a filter that selects for one model's Dice would otherwise inflate it.
JUDGE_SEED = 7919


def passes(scores: dict, min_dice: float, min_confidence: float, min_focus_dice: float | None = None) -> bool:
    """Keep a sample whose Dice (if scored), focus-class Dice (if scored) and intended-class confidence (if scored) reach the thresholds."""
    limits = {"dice": min_dice or 0.0, "confidence": min_confidence or 0.0, "focus_dice": min_focus_dice or 0.0}
    for key, value in scores.items():
        if key in limits and (value is None or math.isnan(value) or value < limits[key]):
            return False
    return True


class Judges:
    """The quality filter's judges, trained on the real train split: per-sample scores and the keep rule."""

    def __init__(self, cfg, segmenter=None, classifier=None, n_classes: int = 0, label_index: dict | None = None, thresholds: dict | None = None,
                 dice_per_image=None, class_names: list[str] | None = None):
        self.cfg, self.segmenter, self.classifier, self.dice_per_image = cfg, segmenter, classifier, dice_per_image
        self.n_classes, self.label_index = n_classes, label_index or {}
        self.class_codes = {name: code for code, name in enumerate(class_names or [], start=1)}
        self.thresholds = thresholds or {}  # {"dice": t, "confidence": t}: resolved (explicit or from real validation images)

    def score(self, images: np.ndarray, items: list[dict], store) -> list[dict]:
        scores = [{} for _ in items]
        if self.segmenter is not None:
            from synthmed.models.tasknets import predict

            masks = np.stack([store.mask(it) for it in items])
            pred = predict(self.segmenter, images)
            for s, d in zip(scores, self.dice_per_image(pred, masks, self.n_classes)):
                s["dice"] = float(d)
            if self.cfg.min_focus_dice is not None:
                for s, it, p, m in zip(scores, items, pred, masks):
                    focus = [self.class_codes[c] for c in it.get("focus") or [] if c in self.class_codes and (m == self.class_codes[c]).any()]
                    if focus:  # judged per class: the judge must find the classes this sample was made for
                        s["focus_dice"] = float(np.mean([2 * ((p == c) & (m == c)).sum() / ((p == c).sum() + (m == c).sum()) for c in focus]))
        if self.classifier is not None:
            from synthmed.models.tasknets import predict_proba

            probs = predict_proba(self.classifier, images)
            for s, p, it in zip(scores, probs, items):
                s["confidence"] = float(p[self.label_index[str(it["label"])]])
        return scores

    def accept(self, score: dict) -> bool:
        return passes(score, self.thresholds.get("dice", 0.0), self.thresholds.get("confidence", 0.0), self.cfg.min_focus_dice if self.segmenter is not None else None)

    def describe(self) -> dict:
        return {"by": self.cfg.by, "min_dice": self.thresholds.get("dice"), "min_confidence": self.thresholds.get("confidence"),
                "min_focus_dice": self.cfg.min_focus_dice if self.segmenter is not None else None,
                "thresholds_from": {k: ("given" if getattr(self.cfg, f"min_{k}") is not None else f"quantile {self.cfg.real_quantile} of real validation images")
                                    for k in ("dice", "confidence") if k in self.thresholds},
                "real_validation_scores": self.thresholds.get("validation"),
                "attempts": self.cfg.attempts,
                "segmenter": (f"MONAI UNet trained on the real train split (Dice+CE, class weighting {self.cfg.segmenter.class_weighting}), seed offset {JUDGE_SEED}"
                              if self.segmenter is not None else None),
                "classifier": (f"{type(self.classifier).__name__} ({self.cfg.classifier_arch}) trained on the real train split (class-balanced)"
                               if self.classifier is not None else None)}


def load_judges(store, data: Path, cfg: GenerateConfig, state, dice_per_image):
    """Train (process 0, once: saved in STORE/judges) and load the filter's judges; None for filter.by none."""
    from synthmed.data.prepared import read_card
    from synthmed.data.metadata import read_metadata

    f = cfg.filter
    if f.by == "none":
        return None
    folder = store.root / "judges"
    want_seg, want_clf = f.by in ("dice", "both"), f.by in ("confidence", "both")
    class_names = list(read_card(data).get("classes") or [])
    n_classes = len(class_names)
    rows = read_metadata(data / "train" / "metadata.jsonl")  # the rows only: images are loaded only to train
    if want_seg and not all("mask" in r for r in rows):
        raise SynthmedError(f"{data}: filter by dice needs masks in the train split; use filter.by confidence")
    if want_clf and any(r.get("label") is None for r in rows):
        raise SynthmedError(f"{data}: filter by confidence needs a label on every training sample")
    names = sorted({str(r.get("label")) for r in rows})
    device = "cuda" if state.device.type == "cuda" else "cpu"
    if state.is_main_process and not (folder / "done.json").is_file():
        _train_judges(folder, data, cfg, want_seg, want_clf, n_classes, names, device, dice_per_image)
    state.wait_for_everyone()
    seg = load_weights(build_segmenter(n_classes), folder / "segmenter.safetensors", device) if want_seg else None
    done = read_json(folder / "done.json")
    clf = load_weights(build_classifier(len(names), arch=done.get("classifier_arch", "resnet"), image_size=done.get("image_size")),
                       folder / "classifier.safetensors", device) if want_clf else None  # its stem strides by size
    thresholds = done["thresholds"]
    return Judges(f, seg, clf, n_classes, {n: i for i, n in enumerate(names)}, thresholds, dice_per_image, class_names)


def _train_judges(folder: Path, data: Path, cfg: GenerateConfig, want_seg: bool, want_clf: bool, n_classes: int, names: list[str], device: str, dice_per_image) -> None:
    """Train the judges on the real train split, save their weights, resolve the thresholds; done.json marks completion."""
    from synthmed.data.prepared import load_split
    from synthmed.training.tasks import train_classifier, train_segmenter

    f = cfg.filter
    train = load_split(data, "train")
    folder.mkdir(parents=True, exist_ok=True)
    seg = clf = None
    if want_seg:
        with task("filter: train segmenter (real train split)", f.segmenter.steps) as update:
            seg = train_segmenter(train.images, train.masks, n_classes, f.segmenter.steps, f.segmenter.batch_size, f.segmenter.lr, cfg.seed + JUDGE_SEED, update,
                                  device=device, class_weighting=f.segmenter.class_weighting, checkpoint=_judge_state(folder, "segmenter", f.segmenter.steps))
    if want_clf:
        codes = np.array([names.index(str(r.get("label"))) for r in train.rows])
        with task("filter: train classifier (real train split)", f.classifier.steps) as update:
            clf = train_classifier(train.images, codes, len(names), f.classifier.steps, f.classifier.batch_size, f.classifier.lr, cfg.seed + JUDGE_SEED, update,
                                   device=device, arch=f.classifier_arch, checkpoint=_judge_state(folder, "classifier", f.classifier.steps))
    for model, name in ((seg, "segmenter"), (clf, "classifier")):
        if model is not None:
            save_weights(model, folder / f"{name}.safetensors")
    thresholds = _thresholds(data, f, seg, clf, n_classes, names, dice_per_image)
    write_json(folder / "done.json", {"segmenter_steps": f.segmenter.steps, "segmenter_class_weighting": f.segmenter.class_weighting,
                                      "classifier_steps": f.classifier.steps, "classifier_arch": f.classifier_arch, "seed": cfg.seed + JUDGE_SEED,
                                      "classes": names, "thresholds": thresholds, "image_size": int(min(train.images.shape[1:3]))})
    for state in folder.glob("*-state.pt"):
        state.unlink()


def _judge_state(folder: Path, name: str, steps: int):
    """A judge's training checkpoint in the run's partial folder (about ten saves a training): an interrupted
    generate continues the judge where it stopped instead of from step 0."""
    from synthmed.training.common import PhaseCheckpoint

    return PhaseCheckpoint(folder, f"{name}-state", max(1, steps // 10))


def _thresholds(data: Path, f, seg, clf, n_classes: int, names: list[str], dice_per_image) -> dict:
    """The keep thresholds: as given, or the judge's `real_quantile` score on the real validation split."""
    from synthmed.data.prepared import load_split

    out, validation = {}, {}
    if (seg is not None and f.min_dice is None) or (clf is not None and f.min_confidence is None):
        try:
            val = load_split(data, "validation", need_masks=seg is not None and f.min_dice is None)
        except SynthmedError as exc:
            raise SynthmedError(f"{exc}; the automatic filter threshold needs it (or give filter.min_dice / filter.min_confidence)") from None
    if seg is not None:
        if f.min_dice is None:
            from synthmed.models.tasknets import predict

            scores = dice_per_image(predict(seg, val.images), val.masks, n_classes)
            validation["dice"] = {"mean": float(scores.mean()), "n": len(scores)}
        out["dice"] = f.min_dice if f.min_dice is not None else float(np.quantile(scores, f.real_quantile))
    if clf is not None:
        if f.min_confidence is None:
            from synthmed.models.tasknets import predict_proba

            idx = np.array([names.index(str(r.get("label"))) if str(r.get("label")) in names else -1 for r in val.rows])
            if not (idx >= 0).any():
                raise SynthmedError(f"{data}: no validation sample has a label of the train split ({', '.join(names)}); "
                                    "give filter.min_confidence")
            probs = predict_proba(clf, val.images[idx >= 0])
            scores = probs[np.arange(len(probs)), idx[idx >= 0]]
            validation["confidence"] = {"mean": float(scores.mean()), "n": len(scores)}
        out["confidence"] = f.min_confidence if f.min_confidence is not None else float(np.quantile(scores, f.real_quantile))
    if validation:
        out["validation"] = validation
    return out

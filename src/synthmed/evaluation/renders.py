"""Evaluation sections that draw images with the trained model: same-mask regeneration of real validation masks
and class steering (each validation map rendered once per class). Both draw through generation's one loop
(`draw_all`) with the synthetic set's sampler settings.

Validation, not test: nothing derived from the test split feeds generation; the ControlNet never trained on
validation samples either, so the renders measure unseen masks. They stay in the evaluation folder and never
enter a synthetic training set.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from synthmed.core.io import SynthmedError, save_png
from synthmed.core.progress import task
from synthmed.evaluation.sections import edge_fidelity, interval


def _render(data: Path, model: Path, training: dict, gen, cond: np.ndarray, items: list[dict], seeds: list[int], device: str, what: str):
    """(images as stored, as RGB, prompts) of the trained model for each conditioning image and item's prompt."""
    import torch

    from synthmed.data.prepared import read_card
    from synthmed.data.prompts import prompt_rule
    from synthmed.generation.draw import as_rgb, draw_all, grey_limit, sampler_for
    sampler, _ = sampler_for(model, training, data, gen, None, torch.device(device))
    prompts = prompt_rule(data, training)(items)
    with task(what, len(items)) as update:
        stored = draw_all(sampler, cond, prompts, seeds, gen.batch_size, grey_limit(read_card(data), gen), update)
    return stored, as_rgb(stored), prompts


def regenerate(data, model, synthetic, n: int, seed: int, device: str):
    """Same-mask regeneration: up to n real validation samples' conditioning, drawn again with the trained
    model and the synthetic set's sampler settings. -> (validation split, images, row indices) or None."""
    from synthmed.config import GenerateConfig, load_yaml_config
    from synthmed.data.prepared import load_conditioning, load_split, read_card
    from synthmed.generation.plan import sample_seed
    from synthmed.models.trained import read_training

    data, model, synthetic = Path(data), Path(model), Path(synthetic)
    if n <= 0 or "validation" not in read_card(data).get("splits", {}):
        return None
    saved = synthetic / "generate_config.yaml"
    gen = load_yaml_config(saved, GenerateConfig) if saved.is_file() else GenerateConfig()
    val = load_split(data, "validation")
    pick = np.sort(np.random.default_rng(seed).permutation(len(val))[:n])
    items = [{"row_fields": val.rows[i], "prompt": val.rows[i].get("text", ""), "label": val.rows[i].get("label")} for i in pick]
    _, images, _ = _render(data, model, read_training(model), gen, load_conditioning(val)[pick], items, [sample_seed(seed, int(i), 0) for i in pick], device,
                           "evaluate: same-mask regeneration (real validation masks)")
    return val, images, pick


def steering(data, model, gen, cfg, ecfg, target_field: str, positive: str | None, out, device: str, label_map: dict | None = None) -> dict:
    """Class steering (SteeringConfig `cfg`): each of cfg.n_maps real validation maps rendered once per class, with the
    same seed, judged by a classifier trained on the real train split's `target_field`. Grid images go to `out`;
    `gen` (GenerateConfig) gives the sampler settings, `ecfg` (EvaluateConfig) the intervals, edge tolerance and model cache."""
    from synthmed.data.prepared import load_conditioning, load_split, read_card
    from synthmed.evaluation.steering import steering_scores
    from synthmed.generation.plan import sample_seed
    from synthmed.models.tasknets import predict_proba
    from synthmed.models.trained import has_controlnet, read_training

    data, model, out = Path(data), Path(model), Path(out)
    training = read_training(model)
    if training.get("conditioning_mode") == "mask":
        return {"skipped": f"{model}: trained with conditioning_mode mask (empty prompts): a prompt cannot steer it"}
    if not has_controlnet(training):
        return {"skipped": f"{model}: a text-only model has no conditioning map to hold fixed"}
    train, val = load_split(data, "train"), load_split(data, "validation")
    plan = _SteeringPlan(data, train, val, cfg, target_field, label_map)
    cond = load_conditioning(val)
    grey, rendered, texts = _render(data, model, training, gen, cond[plan.rows], plan.items(), [sample_seed(cfg.seed, i, 0) for _, i, _ in plan.trials], device,
                                    "evaluate: class steering (real validation maps x classes)")
    clf = plan.classifier(ecfg, device)
    predicted = [plan.targets[k] for k in predict_proba(clf, rendered).argmax(1)]
    real_pred = [plan.targets[k] for k in predict_proba(clf, val.images[plan.pick]).argmax(1)]
    positive = positive or min(plan.targets, key=lambda t: int((plan.y == plan.targets.index(t)).sum()))
    scores = steering_scores([m for m, _, _ in plan.trials], [plan.source_target(i) for i in plan.rows],
                             [plan.to_target[c] for _, _, c in plan.trials], predicted, positive, ecfg.n_boot, ecfg.seed)
    real_hits = np.array([p == plan.source_target(i) for p, i in zip(real_pred, plan.pick)], dtype=float)
    return {
        **scores,
        "field": cfg.field, "classes": plan.classes, "target_field": target_field, "class_to_target": plan.to_target,
        "classifier": f"MONAI ResNet trained on the real train split's {target_field} ({', '.join(plan.targets)}), class-balanced, {cfg.classifier.steps} steps",
        "classifier_on_real_maps": interval(real_hits, ecfg),
        "edge_fidelity": edge_fidelity(read_card(data), rendered, cond[plan.rows], None if val.masks is None else val.masks[plan.rows],
                                       ecfg, "steered renders vs their maps"),
        "protocol": "real validation maps (never trained on), balanced over the steered classes; each rendered once per class with the same seed; "
                    "prompt: the most frequent training prompt of that class" + (f" with the map's {cfg.match_field}" if cfg.match_field else ""),
        "grid": plan.grid(out, grey, texts, predicted),
    }


class _SteeringPlan:
    """Which validation maps are rendered as which class with which prompt, and the classifier that judges them."""

    def __init__(self, data: Path, train, val, cfg, target_field: str, label_map: dict | None):
        from synthmed.data.prepared import label_target

        self.data, self.train, self.val, self.cfg, self.target_field, self.label_map = data, train, val, cfg, target_field, label_map
        field = cfg.field
        self.classes = cfg.classes or sorted({str(r.get(field)) for r in val.rows if r.get(field) is not None})

        def target_of(r):  # the classifier's class of a row, read as the downstream study reads it
            return label_target(r, target_field, label_map)

        self.target_of = target_of
        missing = next((r["id"] for r in train.rows if target_of(r) is None), None)
        if missing is not None:
            raise SynthmedError(f"{data}: steering's classifier needs a {target_field!r} on every training sample; {missing} has none")
        # target of each steered value, from the training rows (e.g. label malignant -> cancer cancerous)
        to_target = {c: Counter(target_of(r) for r in train.rows if str(r.get(field)) == c).most_common(1) for c in self.classes}
        if any(not v for v in to_target.values()):
            raise SynthmedError(f"{data}: steering classes {[c for c, v in to_target.items() if not v]} have no training rows with {field!r}")
        self.to_target = {c: v[0][0] for c, v in to_target.items()}
        self.targets = sorted({target_of(r) for r in train.rows})
        if len(self.targets) < 2:
            raise SynthmedError(f"{data}: steering needs 2+ classes of {target_field!r} in the train split")
        rng = np.random.default_rng(cfg.seed)
        per = max(1, cfg.n_maps // len(self.classes))
        self.pick = [int(i) for c in self.classes for i in rng.permutation([j for j, r in enumerate(val.rows) if str(r.get(field)) == c])[:per]]
        self.trials = [(m, i, c) for m, i in enumerate(self.pick) for c in self.classes]
        self.rows = [i for _, i, _ in self.trials]  # the validation row of each trial
        self.y = np.array([self.targets.index(target_of(r)) for r in train.rows])

    def source_target(self, i: int) -> str:
        """The classifier's class of validation map i's own (real) class."""
        return self.to_target[str(self.val.rows[i].get(self.cfg.field))]

    def items(self) -> list[dict]:
        """Each trial's row as the prompt rule reads it: the map's row with the steered class."""
        field, match = self.cfg.field, self.cfg.match_field
        prompts = {}  # (class, match value) -> the most frequent training prompt
        for r in self.train.rows:
            prompts.setdefault((str(r.get(field)), r.get(match) if match else None), Counter())[r["text"]] += 1

        def prompt_of(c, row):
            counts = prompts.get((c, row.get(match) if match else None)) or sum((v for (k, _), v in prompts.items() if k == c), Counter())
            return counts.most_common(1)[0][0]

        val = self.val.rows
        return [{"row_fields": {**val[i], field: c, "label": c if field == "label" else val[i].get("label")},
                 "prompt": prompt_of(c, val[i]), "label": c if field == "label" else val[i].get("label")} for _, i, c in self.trials]

    def classifier(self, ecfg, device: str):
        """The judge: trained on the real train split's target field (cached by data, settings and seed)."""
        from synthmed.models.tasknets import build_classifier, stem_key
        from synthmed.training.cache import cached_model, data_key
        from synthmed.training.tasks import train_classifier

        cfg, train = self.cfg, self.train

        def fit():
            with task("evaluate: train steering classifier (real train split)", cfg.classifier.steps) as update:
                return train_classifier(train.images, self.y, len(self.targets), cfg.classifier.steps, cfg.classifier.batch_size, cfg.classifier.lr, cfg.seed + 3, update, device=device)

        size = min(train.images.shape[1:3])
        key = {**data_key(self.data, train), "target": self.target_field, "label_map": self.label_map, "steps": cfg.classifier.steps, "seed": cfg.seed + 3,
               **stem_key(size)}
        return cached_model(ecfg.model_cache, "steering-classifier", key, lambda: build_classifier(len(self.targets), train.images.shape[-1], image_size=size), fit, device)

    def grid(self, out: Path, grey: np.ndarray, texts: list[str], predicted: list[str]) -> list[dict]:
        """The first 8 maps: their real image and each class's render (saved in `out`) with its prompt and verdict."""
        data, val, field = self.data, self.val, self.cfg.field
        out.mkdir(parents=True, exist_ok=True)
        grid = []
        for m, i in enumerate(self.pick[:8]):
            row = {"id": val.ids[i], "source": str(val.rows[i].get(field)), "map": str(data.resolve() / "validation" / val.rows[i]["conditioning_image"]),
                   "real": str(data.resolve() / "validation" / val.rows[i]["file_name"]), "renders": {}}
            for k, (mm, _, c) in enumerate(self.trials):
                if mm == m:
                    path = out / f"{val.ids[i]}_as_{c}.png"
                    save_png(path, grey[k])
                    row["renders"][c] = {"path": str(path.resolve()), "prompt": texts[k], "classifier": predicted[k]}
            grid.append(row)
        return grid

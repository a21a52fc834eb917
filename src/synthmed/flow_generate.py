"""`synthmed generate`: plan ▸ layouts ▸ sample (sharded, resumable) ▸ filter ▸ export.

Runs as one process or under `accelerate launch --num_processes N`: process 0 writes the plan
(and trains the quality filter's judges), every process draws the planned samples whose index
is its rank modulo N, and process 0 writes the manifest and renames OUT.partial to OUT.
Sample i's seed depends on (seed, i, attempt) only and batches are padded so that no row sees
its neighbours, so the output is the same whatever the batch size or number of processes.
"""

from __future__ import annotations

import hashlib
from collections import deque
from pathlib import Path

import numpy as np

from synthmed.config import GenerateConfig, config_yaml
from synthmed.io import SynthmedError, check_new_output, folder_hash, read_json, write_json
from synthmed.progress import task

# The filter's judges train with this offset on the seed, so that `evaluate`'s segmenter (same recipe,
# seed 0) is a different model: a filter that selects for one model's Dice would otherwise inflate it.
JUDGE_SEED = 7919


def generate(data: Path, model: Path, cfg: GenerateConfig, out: Path, backbone: str | None = None) -> Path:
    """Synthesise the planned samples from training-split layouts, with provenance per sample."""
    from accelerate import PartialState

    from synthmed.generation.store import GenerationStore

    data, model, out = Path(data), Path(model), Path(out)
    state = PartialState(cpu=_cpu_only())
    if state.device.type == "cpu" and cfg.cpu_threads:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    training = read_json(model / "training.json")
    if not has_controlnet(training) and cfg.filter.by in ("dice", "both"):
        raise SynthmedError(f"{model}: trained with conditioning_mode {training.get('conditioning_mode')!r} (no ControlNet): its images follow prompts, "
                            "not masks, so filter.by dice does not apply; use filter.by none or confidence")
    partial = out.with_name(out.name + ".partial")
    if state.is_main_process:
        check_new_output(out)
    store = GenerationStore(partial)
    identity = _identity(data, model, cfg, backbone)
    if state.is_main_process:
        _plan(store, data, cfg, identity)
    state.wait_for_everyone()
    summary, items = store.read_plan()
    judges = _judges(store, data, cfg, state)
    sampler, provenance = _sampler(data, model, training, cfg, backbone, state.device)
    todo = [it for it in items if it["index"] % state.num_processes == state.process_index]
    with task(f"generate (process {state.process_index + 1}/{state.num_processes})" if state.num_processes > 1 else "generate", len(todo)) as update:
        draw_shard(store, todo, sampler, judges, cfg, _prompt_rule(data, training), update, grey_limit=grey_limit(data, cfg))
    state.wait_for_everyone()
    if state.is_main_process:
        card = _card(data, model, summary, cfg, judges)
        store.finish(out, card, lambda item, rec: _row(item, rec, provenance), extras={"generate_config.yaml": config_yaml(cfg)},
                     before_rename=lambda root: _export(root, cfg.export))
    state.wait_for_everyone()
    return out


def has_controlnet(training: dict) -> bool:
    """Whether a trained model has a ControlNet (conditioning_mode text trains the UNet alone: text-only sampling)."""
    return "controlnet" in training.get("outputs", {"controlnet": "controlnet"})


def _cpu_only() -> bool:
    """Processes run on CPU when asked (ACCELERATE_USE_CPU, as `accelerate launch --cpu` sets) or when there is no GPU."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def _identity(data: Path, model: Path, cfg: GenerateConfig, backbone: str | None) -> str:
    """What a resumed run must share with the interrupted one (not batch size, threads or export)."""
    keep = cfg.model_dump(mode="json", exclude={"batch_size", "export", "cpu_threads"})
    text = repr((str(data.resolve()), str(model.resolve()), backbone, keep))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plan(store, data: Path, cfg: GenerateConfig, identity: str) -> None:
    """Write the plan once; a resumed run checks that it was made with the same settings."""
    from synthmed.generation.plan import make_plan

    if (store.root / "plan.json").is_file():
        made = read_json(store.root / "plan.json").get("identity")
        if made != identity:
            raise SynthmedError(f"{store.root}: an interrupted run with other settings (data, model or generate config); remove it or use them again")
        return
    train = _training_layouts(data)
    try:
        summary, entries = make_plan(train, cfg.plan, cfg.n_samples, cfg.layouts, cfg.seed)
    except ValueError as exc:
        raise SynthmedError(f"{data}: {exc}") from None
    summary["identity"] = identity
    summary["layouts"] = cfg.layouts.model_dump(mode="json")
    store.write_plan(summary, entries)


def _training_layouts(data: Path):
    """The training split's rows, masks, instances and conditioning (never validation/test)."""
    from synthmed.data.conditioning import spec_from_card
    from synthmed.data.prepared import load_conditioning, load_split, read_card
    from synthmed.generation.plan import TrainingLayouts
    from synthmed.io import load_png

    card = read_card(data)
    split = load_split(data, "train")  # hygiene: only the training split feeds generation
    cond = load_conditioning(split)
    classes = card.get("classes") or []
    instances = [load_png(data / "train" / r["instance_mask"]).astype(np.int32) if "instance_mask" in r else None for r in split.rows]
    spec = spec_from_card(card)
    labels = [r.get("label") for r in split.rows]
    if split.masks is None:
        classes = sorted({str(x) for x in labels if x is not None}) or classes
    return TrainingLayouts(split.rows, classes, split.masks, instances, cond, labels, spec)


def _prompt_rule(data: Path, training: dict):
    """item -> the prompt the model was trained to read for it (mask mode: empty; label prompts)."""
    from synthmed.data.prepared import PreparedSplit
    from synthmed.flow_train import trained_prompts

    mode, source, template = training.get("conditioning_mode", "both"), training.get("prompt_source", "text"), training.get("label_prompt", "{label}")

    def prompts(items: list[dict]) -> list[str]:
        rows = [{**it.get("row_fields", {}), "text": it["prompt"], "label": it.get("label")} for it in items]
        return trained_prompts(PreparedSplit(Path(data), "train", rows, None, None), mode, source, template)

    return prompts


def grey_limit(data: Path, cfg: GenerateConfig) -> float | None:
    """None for colour data; for greyscale data (card channels 1) the largest colour residual a kept draw may have."""
    from synthmed.data.prepared import read_card

    if read_card(data).get("channels") != 1:
        return None
    return float("inf") if cfg.grey_max_colour is None else cfg.grey_max_colour


def decoded(images: np.ndarray, limit: float | None) -> tuple[np.ndarray, list[dict]]:
    """Images as stored (grey (B, H, W) for greyscale data) and each one's colour score ({} for colour data)."""
    from synthmed.generation.sample import to_greyscale

    if limit is None:
        return images, [{} for _ in images]
    grey, residual = to_greyscale(images)
    return grey, [{"colour_residual": round(float(r), 3)} for r in residual]


def draw_shard(store, items: list[dict], sampler, judges, cfg: GenerateConfig, prompts_of, progress=None, grey_limit: float | None = None) -> None:
    """Draw this process's planned samples, skipping finished ones; filter and redraw up to cfg.filter.attempts.

    With `grey_limit` (greyscale data) images are kept as their channel mean, and a draw whose colour
    residual exceeds the limit counts as rejected (a colour image is not silently made grey)."""
    from synthmed.generation.plan import sample_seed

    done, rejected = store.finished(), store.rejected_attempts()
    todo = deque((it, rejected[it["id"]]) for it in items if it["id"] not in done)
    finished = len(items) - len(todo)
    if progress:
        progress(finished)
    while todo:
        batch = [todo.popleft() for _ in range(min(cfg.batch_size, len(todo)))]
        chosen = [it for it, _ in batch]
        cond = np.stack([store.conditioning(it) for it in chosen])
        prompts = prompts_of(chosen)
        seeds = [sample_seed(cfg.seed, it["index"], a) for it, a in batch]
        # text-only models draw from the prompt alone; the layout stays on record (evaluate's control)
        images = sampler(cond, prompts, seeds) if sampler.controlnet is not None else sampler(None, prompts, seeds, size=cond.shape[1:3])
        images, colour = decoded(images, grey_limit)
        scores = judges.score(as_rgb(images), chosen, store) if judges else [{} for _ in batch]
        for (item, attempt), image, score, extra, seed, prompt in zip(batch, images, scores, colour, seeds, prompts):
            score = {**score, **extra}
            record = {"attempt": attempt, "seed": seed, "prompt": prompt, "scores": score}
            grey_ok = not extra or extra["colour_residual"] <= grey_limit
            if grey_ok and (not judges or judges.accept(score)):
                store.keep(item, image, record)
                finished += 1
            else:
                last = attempt + 1 >= cfg.filter.attempts
                store.reject(item, image, record, final=last)
                if last:
                    finished += 1
                else:
                    todo.append((item, attempt + 1))
        if progress:
            progress(finished)


def as_rgb(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3): grey images repeated to the 3 channels the judges (like every real split) are loaded with."""
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


def _sampler(data: Path, model: Path, training: dict, cfg: GenerateConfig, backbone: str | None, device):
    """The Sampler over the trained model, and the provenance every sample shares."""
    import torch

    from synthmed.flow import _shipped_hash, _trained_backbone
    from synthmed.generation.sample import Sampler, SamplingSettings
    from synthmed.models.backbone import load_backbone
    from synthmed.models.controlnet import load_controlnet

    backbone_src = backbone or training["backbone"]
    bb = _trained_backbone(load_backbone(backbone_src), model, training).freeze()
    controlnet = load_controlnet(model / "controlnet") if has_controlnet(training) else None
    settings = SamplingSettings(cfg.scheduler, cfg.steps, cfg.guidance_scale, cfg.conditioning_scale, cfg.guess_mode,
                                cfg.control_start, cfg.control_end, cfg.negative_prompt)
    precision = cfg.precision if cfg.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    parts = training.get("output_hashes") or {}
    model_hash = training.get("controlnet_hash") or (hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16] if parts else folder_hash(model / "controlnet"))
    provenance = {
        "model": str(model.resolve()),
        "model_hash": model_hash,
        "trained_parts": training.get("output_hashes", {"controlnet": model_hash}),
        "backbone": backbone_src,
        "backbone_hash": folder_hash(Path(bb.source)) if Path(bb.source).is_dir() else _shipped_hash(backbone_src),
        "real_data": str(data.resolve()),
        "source_split": "train",
        **settings.record(),
        "precision": precision,
        "device": device.type,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    return Sampler(bb, controlnet, settings, device=str(device), dtype=dtype), provenance


def _row(item: dict, record: dict, shared: dict) -> dict:
    """The metadata.jsonl row of a kept sample: prepared-layout columns + provenance."""
    files = item["files"]
    row = {**item["row_fields"], "file_name": f"images/{item['id']}.png", "id": item["id"], "text": item["prompt"], **files,
           "label": item.get("label"), "patient_id": item.get("patient_id"), "split": "train", "source": f"synthetic:{item['source_id']}",
           "synthetic": True}
    for key in ("classes", "objects", "pixels"):
        if key in item:
            row[key] = item[key]
    row["provenance"] = {
        **shared,
        "prompt": record["prompt"],
        "seed": record["seed"],
        "attempt": record["attempt"],
        "source_mask_id": item["source_id"],
        "layout": item["layout"],
        "plan_focus": item["focus"],
        "filter_scores": record["scores"],
    }
    return row


class Judges:
    """The quality filter's judges, trained on the real train split: per-sample scores and the keep rule."""

    def __init__(self, cfg, segmenter=None, classifier=None, n_classes: int = 0, label_index: dict | None = None, thresholds: dict | None = None):
        self.cfg, self.segmenter, self.classifier = cfg, segmenter, classifier
        self.n_classes, self.label_index = n_classes, label_index or {}
        self.thresholds = thresholds or {}  # {"dice": t, "confidence": t}: resolved (explicit or from real validation images)

    def score(self, images: np.ndarray, items: list[dict], store) -> list[dict]:
        from synthmed.evaluation.metrics import dice_per_image

        scores = [{} for _ in items]
        if self.segmenter is not None:
            from synthmed.evaluation.segmenter import predict

            masks = np.stack([store.mask(it) for it in items])
            for s, d in zip(scores, dice_per_image(predict(self.segmenter, images), masks, self.n_classes)):
                s["dice"] = float(d)
        if self.classifier is not None:
            from synthmed.evaluation.classifier import predict_proba

            probs = predict_proba(self.classifier, images)
            for s, p, it in zip(scores, probs, items):
                s["confidence"] = float(p[self.label_index[str(it["label"])]])
        return scores

    def accept(self, score: dict) -> bool:
        from synthmed.generation.filter import passes

        return passes(score, self.thresholds.get("dice", 0.0), self.thresholds.get("confidence", 0.0))

    def describe(self) -> dict:
        return {"by": self.cfg.by, "min_dice": self.thresholds.get("dice"), "min_confidence": self.thresholds.get("confidence"),
                "thresholds_from": {k: ("given" if getattr(self.cfg, f"min_{k}") is not None else f"quantile {self.cfg.real_quantile} of real validation images")
                                    for k in ("dice", "confidence") if k in self.thresholds},
                "real_validation_scores": self.thresholds.get("validation"),
                "attempts": self.cfg.attempts,
                "segmenter": f"MONAI UNet trained on the real train split (Dice+CE), seed offset {JUDGE_SEED}" if self.segmenter is not None else None,
                "classifier": "MONAI ResNet trained on the real train split (class-balanced)" if self.classifier is not None else None}


def _judges(store, data: Path, cfg: GenerateConfig, state):
    """Train (process 0, once: saved in OUT.partial/judges) and load the filter's judges."""
    from synthmed.data.prepared import read_card
    from synthmed.evaluation.classifier import build_classifier
    from synthmed.evaluation.segmenter import build_segmenter
    from synthmed.io import read_jsonl

    f = cfg.filter
    if f.by == "none":
        return None
    folder = store.root / "judges"
    want_seg, want_clf = f.by in ("dice", "both"), f.by in ("confidence", "both")
    n_classes = len(read_card(data).get("classes") or [])
    rows = read_jsonl(data / "train" / "metadata.jsonl")  # the rows only: images are loaded only to train
    if want_seg and not all("mask" in r for r in rows):
        raise SynthmedError(f"{data}: filter by dice needs masks in the train split; use filter.by confidence")
    if want_clf and any(r.get("label") is None for r in rows):
        raise SynthmedError(f"{data}: filter by confidence needs a label on every training sample")
    names = sorted({str(r.get("label")) for r in rows})
    device = "cuda" if state.device.type == "cuda" else "cpu"
    if state.is_main_process and not (folder / "done.json").is_file():
        _train_judges(folder, data, cfg, want_seg, want_clf, n_classes, names, device)
    state.wait_for_everyone()
    seg = _load_weights(build_segmenter(n_classes), folder / "segmenter.safetensors", device) if want_seg else None
    clf = _load_weights(build_classifier(len(names)), folder / "classifier.safetensors", device) if want_clf else None
    thresholds = read_json(folder / "done.json")["thresholds"]
    return Judges(f, seg, clf, n_classes, {n: i for i, n in enumerate(names)}, thresholds)


def _train_judges(folder: Path, data: Path, cfg: GenerateConfig, want_seg: bool, want_clf: bool, n_classes: int, names: list[str], device: str) -> None:
    """Train the judges on the real train split, save their weights, resolve the thresholds; done.json marks completion."""
    from safetensors.torch import save_file

    from synthmed.data.prepared import load_split
    from synthmed.evaluation.classifier import train_classifier
    from synthmed.evaluation.segmenter import train_segmenter

    f = cfg.filter
    train = load_split(data, "train")
    folder.mkdir(parents=True, exist_ok=True)
    seg = clf = None
    if want_seg:
        with task("filter: train segmenter (real train split)", f.segmenter_steps) as update:
            seg = train_segmenter(train.images, train.masks, n_classes, f.segmenter_steps, f.batch_size, f.lr, cfg.seed + JUDGE_SEED, update, device=device)
    if want_clf:
        codes = np.array([names.index(str(r.get("label"))) for r in train.rows])
        with task("filter: train classifier (real train split)", f.classifier_steps) as update:
            clf = train_classifier(train.images, codes, len(names), f.classifier_steps, f.batch_size, f.lr, cfg.seed + JUDGE_SEED, update, device=device)
    for model, name in ((seg, "segmenter"), (clf, "classifier")):
        if model is not None:
            save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    thresholds = _thresholds(data, f, seg, clf, n_classes, names)
    write_json(folder / "done.json", {"segmenter_steps": f.segmenter_steps, "classifier_steps": f.classifier_steps, "seed": cfg.seed + JUDGE_SEED,
                                      "classes": names, "thresholds": thresholds})


def _load_weights(model, path: Path, device: str):
    """A judge as saved by `_train_judges` (safetensors), in eval mode on the device."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def _thresholds(data: Path, f, seg, clf, n_classes: int, names: list[str]) -> dict:
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
            from synthmed.evaluation.metrics import dice_per_image
            from synthmed.evaluation.segmenter import predict

            scores = dice_per_image(predict(seg, val.images), val.masks, n_classes)
            validation["dice"] = {"mean": float(scores.mean()), "n": len(scores)}
        out["dice"] = f.min_dice if f.min_dice is not None else float(np.quantile(scores, f.real_quantile))
    if clf is not None:
        if f.min_confidence is None:
            from synthmed.evaluation.classifier import predict_proba

            idx = np.array([names.index(str(r.get("label"))) if str(r.get("label")) in names else -1 for r in val.rows])
            probs = predict_proba(clf, val.images[idx >= 0])
            scores = probs[np.arange(len(probs)), idx[idx >= 0]]
            validation["confidence"] = {"mean": float(scores.mean()), "n": len(scores)}
        out["confidence"] = f.min_confidence if f.min_confidence is not None else float(np.quantile(scores, f.real_quantile))
    if validation:
        out["validation"] = validation
    return out


def _card(data: Path, model: Path, summary: dict, cfg: GenerateConfig, judges) -> dict:
    from synthmed.data.prepared import read_card

    card = read_card(data)
    syn = {k: card[k] for k in ("classes", "labels", "label_map", "image_size", "channels", "conditioning", "task") if k in card}
    syn.update(name=f"synthetic:{card.get('name', 'data')}", source="synthmed generate", real_data=str(data.resolve()), model=str(model.resolve()),
               filter=judges.describe() if judges else None)
    limit = grey_limit(data, cfg)
    if limit is not None:
        syn["greyscale"] = {"vae": "grey in as R = G = B; the 3 decoded channels saved as their mean (1-channel PNG)",
                            "colour_residual": "mean absolute deviation of the decoded channels from their mean, grey levels 0-255, per draw in provenance.filter_scores",
                            "max_colour_residual": None if limit == float("inf") else limit}
    return syn


def _export(root: Path, formats: list[str]) -> None:
    """Also write the finished set in the formats asked for, under ROOT/export/<format>."""
    from synthmed.generation.export import export_dataset

    for fmt in formats:
        export_dataset(root, fmt, root / "export" / fmt)

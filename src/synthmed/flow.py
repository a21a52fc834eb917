"""The user's flow as Python functions, one per CLI command: they wire the layers together.

prepare -> train (backbone | controlnet) -> generate -> evaluate -> report; `run` chains them
for an experiment and `demo` runs the embedded default end to end.
"""

from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path

from synthmed import __version__
from synthmed.config import BackboneConfig, ControlNetConfig, EvaluateConfig, GenerateConfig, PrepareConfig, RunConfig, config_yaml, save_config
from synthmed.io import SynthmedError, atomic_dir, check_new_output, write_json
from synthmed.progress import task

PHANTOM = "phantom-histology"

from synthmed.flow_generate import generate  # noqa: E402  (the `generate` and `train controlnet` flows live beside this one)
from synthmed.flow_train import train_controlnet  # noqa: E402


def prepare(cfg: PrepareConfig, out: Path) -> dict:
    """Write a source data set into the prepared layout; returns its dataset.json card.

    Resumes an interrupted run (OUT.partial) and is a no-op on a finished OUT with the same settings.
    """
    import hashlib
    import os

    from synthmed.data.conditioning import CANNY_DEFAULTS, ConditioningSpec
    from synthmed.data.pipeline import PrepareSettings, prepare_dataset
    from synthmed.data.readers.base import reader_class

    cls = reader_class(cfg.source)
    if cfg.source == PHANTOM:
        p = cfg.phantom
        reader = cls(None, p.model_dump(exclude={"seed"}), seed=p.seed)  # generated: no root
    elif cls.generated:
        reader = _generated_reader(cls, cfg)
    else:
        if not cfg.root:
            raise SynthmedError(f"prepare {cfg.source}: --root (the source download's folder) is required")
        reader = cls(Path(cfg.root).resolve(), cfg.options, seed=cfg.seed)
    cond = cfg.conditioning
    classes = reader.card().get("classes", [])
    try:
        edges = {**CANNY_DEFAULTS, **getattr(reader, "default_canny", {}),
                 **{k: v for k, v in (("sigma", cond.canny_sigma), ("low", cond.canny_low), ("high", cond.canny_high)) if v is not None}}
        spec = ConditioningSpec(tuple(cond.builders or reader.default_conditioning), edges["sigma"], edges["low"], edges["high"],
                                cond.canny_region, n_classes=max(1, len(classes)))
    except ValueError as exc:
        raise SynthmedError(f"conditioning: {exc}") from None
    identity = cfg.model_copy(update={"workers": 0, "skip_bad": False, "root": str(Path(cfg.root).resolve()) if cfg.root else None})
    settings = PrepareSettings(
        size=cfg.size if cfg.size is not None else reader.default_size,
        resize=cfg.resize or reader.default_resize,
        limit=cfg.limit,
        workers=cfg.workers or min(4, os.cpu_count() or 1),
        skip_bad=cfg.skip_bad,
        official_splits=cfg.official_splits,
        fractions=tuple(cfg.split_fractions),
        seed=cfg.seed,
        conditioning=spec,
        prompt_template=cfg.prompt_template,
        fingerprint=hashlib.sha256(config_yaml(identity).encode()).hexdigest()[:16],
    )
    with task(f"prepare {cfg.source}", 0) as update:
        card = prepare_dataset(reader, out, settings, progress=update, extras={"prepare_config.yaml": config_yaml(cfg)})
    return card


def _generated_reader(cls, cfg: PrepareConfig):
    """A reader that makes its data from a seed: no root; options from cfg.options, the seed from cfg.seed."""
    if cfg.root:
        raise SynthmedError(f"prepare {cfg.source}: generated from its seed, it takes no --root")
    options = dict(cfg.options)
    if cfg.size is not None and "size" in cls.Options.model_fields:
        options.setdefault("size", cfg.size)  # render at the asked size (continuous geometry) rather than resize
    return cls(None, options, seed=cfg.seed)


def environment() -> dict:
    """What produced an output: versions and machine, saved beside results."""
    import torch
    import diffusers
    import monai

    return {
        "synthmed": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "monai": monai.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }


def train_backbone(data: Path, cfg: BackboneConfig, out: Path, resume: bool = False) -> Path:
    """Pretrain a backbone preset on the unlabelled split (VAE, then text-to-image UNet).

    Phase checkpoints go to OUT.partial/ while training; `resume` continues from them exactly,
    and they are removed once OUT is complete.
    """
    import shutil

    import torch

    from synthmed.data.prepared import load_split
    from synthmed.models.backbone import build_backbone
    from synthmed.training.backbone import train_text_to_image, train_vae

    out = Path(out)
    check_new_output(out)
    state = out.with_name(out.name + ".partial")
    if state.exists() and not resume:
        raise SynthmedError(f"{state}: an interrupted run's checkpoints are here; add --resume to continue, or remove it")
    split = load_split(data, "unlabelled")
    torch.manual_seed(cfg.seed)
    with atomic_dir(out) as tmp:
        backbone = build_backbone(cfg.preset, seed=cfg.seed)
        started = time.time()
        with task("train backbone: VAE", cfg.vae_steps) as update:
            vae_losses = train_vae(backbone, split.images, cfg, progress=update, state_dir=state)
        with task("train backbone: UNet", cfg.unet_steps) as update:
            unet_losses = train_text_to_image(backbone, split.images, split.prompts, cfg, progress=update, state_dir=state)
        recipe = {
            "made_by": "synthmed train backbone",
            "config": cfg.model_dump(),
            "data": {"path": str(data), "split": "unlabelled", "n_images": len(split)},
            "data_card_generator": _card_generator(data),
            "final_vae_loss": sum(vae_losses[-50:]) / len(vae_losses[-50:]),
            "final_unet_loss": sum(unet_losses[-50:]) / len(unet_losses[-50:]),
            "seconds": round(time.time() - started, 1),
            "environment": environment(),
        }
        backbone.save(tmp, recipe)
        save_config(cfg, tmp / "train_config.yaml")
    shutil.rmtree(state, ignore_errors=True)
    return out


def _card_generator(data: Path) -> dict | None:
    from synthmed.data.prepared import read_card

    return read_card(data).get("generator")


def _device() -> str:
    """The accelerator to use for inference and evaluation models: CUDA when present."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def write_results(out: Path, results: dict) -> None:
    write_json(Path(out) / "results.json", results)


def open_resumable(out: Path, kind: str, resume: bool = True) -> None:
    """An output folder that a later run of the same kind may continue; refuses one holding anything else."""
    from synthmed.io import RUN_MARKER

    check_new_output(out, allow_resume=resume)
    marker = out / RUN_MARKER
    if marker.is_file() and marker.read_text().strip() != kind:
        raise SynthmedError(f"{out}: holds another kind of synthmed output ({marker.read_text().strip()}), not {kind}")
    _mark_run(out, kind)


def _mark_run(out: Path, kind: str) -> None:
    """Create an output folder that a later --resume may continue."""
    from synthmed.io import RUN_MARKER

    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text(kind + "\n")


def _trained_backbone(bb, model: Path, training: dict):
    """The backbone as training left it: UNet LoRA fused in, or the unlocked UNet decoder."""
    from diffusers import UNet2DConditionModel

    from synthmed.models.lora import load_lora

    outputs = training.get("outputs", {})
    if "unet" in outputs:
        bb.unet = UNet2DConditionModel.from_pretrained(model / outputs["unet"], use_safetensors=True)
    if "unet_lora" in outputs:
        load_lora(bb.unet, model / outputs["unet_lora"])
    return bb


def _shipped_hash(name: str) -> str | None:
    from synthmed.io import folder_hash
    from synthmed.models.backbone import shipped_backbone_dir

    folder = shipped_backbone_dir(name)
    return folder_hash(folder) if folder else None


def evaluate(data: Path, synthetic: Path, cfg: EvaluateConfig, out: Path, grid: int = 8, model: Path | None = None) -> dict:  # noqa: C901
    """Plausibility (segmenter Dice/IoU vs conditioning and shuffled masks, real-test reference), fidelity
    (FID/KID/precision-recall in named feature spaces, paired SSIM/PSNR/MS-SSIM), memorisation; 95% bootstrap CIs.

    Paired metrics compare a generated image with the real image of the same mask: replayed training layouts
    (if the synthetic set has any) and, given the trained `model`, `cfg.paired_regeneration` real validation
    masks drawn again (same-mask regeneration on masks the model never trained on)."""
    import numpy as np

    from synthmed.data.prepared import load_split, read_card
    from synthmed import flow_evaluate as fe
    from synthmed.evaluation.metrics import derangement, dice_iou, dice_per_image
    from synthmed.evaluation.segmenter import build_segmenter, predict, train_segmenter
    from synthmed.io import save_png

    out = Path(out)
    check_new_output(out)
    fe.check_extractors(cfg.extractors, cfg)
    card = read_card(data)
    classes = card["classes"]
    train = load_split(data, "train", need_masks=True)
    test = load_split(data, "test", need_masks=True)
    syn = load_split(synthetic, "train", need_masks=True)
    by_id = {sid: i for i, sid in enumerate(train.ids)}
    try:
        src = np.array([by_id[r["provenance"]["source_mask_id"]] for r in syn.rows])
    except KeyError as exc:
        raise SynthmedError(f"{synthetic}: sample without provenance.source_mask_id from {data}'s train split ({exc})") from None
    if syn.images.shape[1:] != train.images.shape[1:]:
        raise SynthmedError(f"{synthetic}: images {syn.images.shape[1:]} differ from real {train.images.shape[1:]}")
    spaces = fe.extractors(cfg.extractors, train, cfg, _device())  # first: a missing weights file fails before any training
    def train_seg():
        with task("train segmenter (real train split)", cfg.segmenter_steps) as update:
            return train_segmenter(train.images, train.masks, len(classes), cfg.segmenter_steps, cfg.segmenter_batch_size, cfg.segmenter_lr, cfg.seed, update, device=_device())

    key = {**fe.data_key(Path(data), train), "steps": cfg.segmenter_steps, "batch_size": cfg.segmenter_batch_size, "lr": cfg.segmenter_lr, "seed": cfg.seed}
    seg = fe.cached_model(cfg.model_cache, "segmenter", key, lambda: build_segmenter(len(classes)), train_seg, _device())
    pred_syn = predict(seg, syn.images)
    perm = derangement(len(syn), cfg.seed)
    real_test = dice_iou(predict(seg, test.images), test.masks, classes)
    generated = dice_iou(pred_syn, syn.masks, classes)
    shuffled = dice_iou(pred_syn, syn.masks[perm], classes)
    # "the real image of the same mask" exists where the layout is the training mask unchanged (replayed);
    # new layouts (flips, warps, pasted objects) have no real twin, regenerated validation masks do
    same = np.array([not (r.get("provenance") or {}).get("layout") for r in syn.rows])
    pairs = {}
    if same.any():
        pairs["replayed"] = fe.paired_metrics(syn.images[same], train.images[src[same]], cfg, "generated vs the real training image of its replayed training mask")
    regen = fe.regenerate(data, model, synthetic, cfg.paired_regeneration, cfg.seed, _device()) if model is not None else None
    if regen is not None:
        val, regen_images, pick = regen
        pairs["regenerated"] = fe.paired_metrics(regen_images, val.images[pick], cfg,
                                                 "same-mask regeneration: real validation masks (never trained on) drawn again with the model and the synthetic set's sampler settings, vs their real images")
    primary = pairs.get("regenerated") or pairs.get("replayed") or {}
    pred_test = predict(seg, test.images)
    k = len(classes)
    feats = fe.embed(spaces, train.images, test.images, syn.images)
    mem = fe.memorisation(syn.images, train.images, test.images, feats, cfg, sources=src)
    mem["pairs"] = fe.closest_pairs(mem, [str(Path(synthetic).resolve() / "train" / r["file_name"]) for r in syn.rows],
                                    [str(Path(data).resolve() / "train" / r["file_name"]) for r in train.rows])
    results = {
        "plausibility": {
            "dice_generated": generated["dice"],
            "dice_shuffled": shuffled["dice"],
            "dice_real_test": real_test["dice"],
            "iou_generated": generated["iou"],
            "iou_shuffled": shuffled["iou"],
            "iou_real_test": real_test["iou"],
            "dice_foreground_generated": generated["dice_foreground"],
            "dice_foreground_shuffled": shuffled["dice_foreground"],
            "dice_foreground_real_test": real_test["dice_foreground"],
            "per_class": {"generated": generated["per_class"], "shuffled": shuffled["per_class"], "real_test": real_test["per_class"]},
            "n_generated": len(syn),
            "n_real_test": len(test),
            "segmenter": "MONAI UNet (16-32-64-128, residual), Dice+CE, trained on the real train split only",
            "intervals": {  # per-image Dice (mean over the classes each image contains), mean with 95% bootstrap CI
                "dice_generated": fe.interval(dice_per_image(pred_syn, syn.masks, k), cfg),
                "dice_shuffled": fe.interval(dice_per_image(pred_syn, syn.masks[perm], k), cfg),
                "dice_real_test": fe.interval(dice_per_image(pred_test, test.masks, k), cfg),
            },
        },
        "generation": _generation_summary(synthetic, seg, classes, generated["dice"]),
        "fidelity": {
            "ssim": (primary.get("ssim") or {}).get("value"),  # the headline pair set's mean (regenerated, else replayed); None without pairs
            "paired": pairs,
            "feature_spaces": fe.fidelity(feats, train, [r.get("label") for r in syn.rows], cfg),
        },
        "edge_fidelity": _edge_fidelity(card, syn, regen, cfg),
        "memorisation": mem,
        "intended_class": fe.intended_class(spaces, syn.images, [r.get("label") for r in syn.rows], cfg),
        "inputs": {"data": str(Path(data).resolve()), "synthetic": str(Path(synthetic).resolve()), "classes": classes},
        "grid": [
            {
                "id": syn.ids[i],
                "mask": str(Path(synthetic).resolve() / "train" / syn.rows[i]["conditioning_image"]),
                "real": str(Path(data).resolve() / "train" / train.rows[src[i]]["file_name"]),
                "generated": str(Path(synthetic).resolve() / "train" / syn.rows[i]["file_name"]),
                "prompt": syn.prompts[i] + ("" if same[i] else " [new layout: the real image is its source before the edits]"),
            }
            for i in _grid_order(same)[:grid]
        ],
        "environment": environment(),
    }
    if regen is not None:
        results["paired_grid"] = [{"id": val.ids[j], "mask": str(Path(data).resolve() / "validation" / val.rows[j]["conditioning_image"]),
                                   "real": str(Path(data).resolve() / "validation" / val.rows[j]["file_name"]),
                                   "generated": str(out.resolve() / "paired" / f"{val.ids[j]}.png"), "prompt": val.prompts[j]} for j in pick[:grid]]
    with atomic_dir(out) as tmp:
        if regen is not None:
            (tmp / "paired").mkdir()
            for j, image in zip(pick, regen_images):
                save_png(tmp / "paired" / f"{val.ids[j]}.png", image)
        write_results(tmp, results)
        save_config(cfg, tmp / "evaluate_config.yaml")
    return results


def _edge_fidelity(card: dict, syn, regen, cfg) -> dict | None:
    """Edge-map fidelity of the synthetic set (and of the same-mask regenerations), None without an edge channel."""
    from synthmed import flow_evaluate as fe
    from synthmed.data.prepared import load_conditioning

    synthetic_set = fe.edge_fidelity(card, syn.images, load_conditioning(syn), syn.masks, cfg, "generated images vs their conditioning edge maps")
    if synthetic_set is None:
        return None
    out = {"synthetic": synthetic_set}
    if regen is not None:
        val, images, pick = regen
        out["regenerated"] = fe.edge_fidelity(card, images, load_conditioning(val)[pick], None if val.masks is None else val.masks[pick], cfg,
                                              "same-mask regeneration: real validation edge maps drawn again, vs those maps")
    return out


def _grid_order(same: np.ndarray) -> list[int]:
    """Replayed layouts first (their real twin is comparable), then new layouts."""
    import numpy as np

    return [int(i) for i in np.flatnonzero(same)] + [int(i) for i in np.flatnonzero(~same)]


def _generation_summary(synthetic: Path, seg, classes: list[str], dice_kept: float) -> dict | None:
    """The plan, the filter's counts, and this (independent) segmenter's Dice on kept vs rejected draws."""
    import numpy as np

    from synthmed.evaluation.metrics import dice_iou
    from synthmed.evaluation.segmenter import predict
    from synthmed.io import load_png, read_json, read_jsonl

    card = read_json(Path(synthetic) / "dataset.json")
    if "plan" not in card:
        return None
    out = {"plan": card["plan"], "filter": card.get("filter"), "filter_summary": card.get("filter_summary"), "dice_kept": dice_kept}
    rejected = Path(synthetic) / "rejected" / "metadata.jsonl"
    if rejected.is_file():
        rows = read_jsonl(rejected)
        images = np.stack([load_png(rejected.parent / r["file_name"])[..., :3] for r in rows])
        masks = np.stack([load_png(_layout_mask(Path(synthetic), r["id"])) for r in rows])
        out["dice_rejected_draws"] = dice_iou(predict(seg, images), masks, classes)["dice"]
        out["n_rejected_draws"] = len(rows)
    return out


def _layout_mask(synthetic: Path, sid: str) -> Path:
    """The mask a draw was conditioned on: kept samples' in train/masks, dropped ones' in rejected/layouts."""
    kept = synthetic / "train" / "masks" / f"{sid}.png"
    return kept if kept.is_file() else synthetic / "rejected" / "layouts" / f"{sid}_masks.png"


def report(results: Path, out: Path, title: str = "synthmed report") -> Path:
    """Render results.json into a self-contained report.html (temporary name, then rename)."""
    import os

    from synthmed.io import read_json
    from synthmed.report.html import render_report

    out = Path(out)
    if out.exists() and out.is_dir():
        raise SynthmedError(f"{out}: report path is a folder; give a file name such as report.html")
    text = render_report(read_json(results), title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def run(cfg: RunConfig, out: Path, resume: bool = True) -> dict:
    """Chain prepare -> train controlnet -> generate -> evaluate -> report in one folder.

    Each stage writes its own subfolder atomically, so re-running on the same folder skips
    finished stages and continues an interrupted ControlNet training from its checkpoint.
    """
    from synthmed.io import read_json

    out = Path(out)
    open_resumable(out, "run", resume)
    save_config(cfg, out / "run_config.yaml")
    started = time.time()
    data = Path(cfg.data) if cfg.data else out / "data"
    if not cfg.data and not (data / "dataset.json").is_file():
        prepare(cfg.prepare, data)
    if cfg.experiment == "ablations":
        from synthmed import flow_study

        results = flow_study.ablations(cfg, out, data)
        flow_study.ablation_report(out / "results.json", out / "report.html")
        write_json(out / "run.json", {"seconds_this_invocation": round(time.time() - started, 1), "report": "report.html", "results": "results.json"})
        return results
    if cfg.experiment == "data_augmentation":
        from synthmed import flow_study

        results = flow_study.data_augmentation(cfg, out, data)
        flow_study.report(out / "downstream" / "results.json", out / "report.html", title="synthmed study: data augmentation")
        write_json(out / "run.json", {"seconds_this_invocation": round(time.time() - started, 1), "report": "report.html", "results": "downstream/results.json"})
        return results
    model = out / "controlnet"
    if not (model / "controlnet" / "config.json").is_file():
        train_controlnet(data, cfg.controlnet, model, resume=True)
    synthetic = out / "synthetic"
    if not (synthetic / "dataset.json").is_file():
        generate(data, model, cfg.generate, synthetic)
    evaluation = out / "evaluation"
    if not (evaluation / "results.json").is_file():
        evaluate(data, synthetic, cfg.evaluate, evaluation, model=model)
    report(evaluation / "results.json", out / "report.html")
    results = read_json(evaluation / "results.json")
    write_json(out / "run.json", {"seconds_this_invocation": round(time.time() - started, 1), "report": "report.html", "results": "evaluation/results.json"})
    return results


def demo_config(quick: bool = False) -> RunConfig:
    """The embedded default: phantom-histology + the shipped tiny backbone. --quick is for tests.

    The full demo generates for the rare class: three times the real training split's dead nuclei
    (copy-paste into flipped/warped training layouts), each sample filtered by a real-trained
    segmenter's Dice against its mask (redrawn up to 5 times). The threshold is explicit (0.4): the tiny
    CPU model's samples score below the automatic one (the judge's 10% quantile on real validation
    images, 0.66 here), which would drop them all.
    """
    from synthmed.config import FilterConfig, PhantomConfig, PlanConfig

    if not quick:
        return RunConfig(prepare=PrepareConfig(phantom=PhantomConfig(n_unlabelled_slides=0)), controlnet=ControlNetConfig(validation_every=500),
                         generate=GenerateConfig(plan=PlanConfig(mode="multiply", classes=["dead"], factor=3), filter=FilterConfig(by="dice", min_dice=0.4, attempts=5)))
    return RunConfig(
        prepare=PrepareConfig(phantom=PhantomConfig(n_slides=9, tiles_per_slide=6, n_unlabelled_slides=0)),
        controlnet=ControlNetConfig(steps=30, batch_size=8, checkpoint_every=20),
        generate=GenerateConfig(n_samples=8, steps=8, batch_size=8, filter=FilterConfig(by="dice", min_dice=0.0, segmenter_steps=30, batch_size=8)),
        evaluate=EvaluateConfig(segmenter_steps=60, segmenter_batch_size=8, domain_steps=20, n_boot=20),
    )


def demo(out: Path, quick: bool = False) -> dict:
    """Run the whole flow on the embedded default."""
    return run(demo_config(quick), out)

"""`synthmed train backbone` and `synthmed train controlnet`: load and check everything, build, train, save."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from synthmed.config import BackboneConfig, ControlNetConfig, DecoderConfig, LoraConfig, save_config
from synthmed.config.settings import settings_changed
from synthmed.core.environment import environment
from synthmed.core.io import SynthmedError, atomic_dir
from synthmed.core.outputs import check_output, mark_output, partial_of
from synthmed.core.progress import note, task

BACKBONE_KIND, MODEL_KIND = "backbone", "controlnet"


def train_backbone(data: Path, cfg: BackboneConfig, out: Path, resume: bool = False) -> Path:
    """Pretrain a backbone preset on the unlabelled split (VAE, then text-to-image UNet).

    Phase checkpoints go to OUT.partial/ while training; `resume` continues from them exactly,
    and they are removed once OUT is complete.
    """
    import torch

    from synthmed.data.prepared import load_split, read_card
    from synthmed.models.backbone import build_backbone
    from synthmed.training.backbone import train_text_to_image, train_vae

    out = Path(out)
    check_output(out, BACKBONE_KIND)
    state = partial_of(out)
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
            "data_card_generator": read_card(data).get("generator"),
            "final_vae_loss": sum(vae_losses[-50:]) / len(vae_losses[-50:]),
            "final_unet_loss": sum(unet_losses[-50:]) / len(unet_losses[-50:]),
            "seconds": round(time.time() - started, 1),
            "round_trip": _round_trip(backbone, data),
            "environment": environment(),
        }
        backbone.save(tmp, recipe)
        save_config(cfg, tmp / "train_config.yaml")
    shutil.rmtree(state, ignore_errors=True)
    return out


def _round_trip(backbone, data: Path) -> dict | None:
    """Per-class reconstruction error of the new VAE on the labelled validation split, where there is one with masks
    (`synthmed evaluate roundtrip` adds a judge's Dice)."""
    from synthmed.data.prepared import load_split, read_card
    from synthmed.evaluation.roundtrip import round_trip

    card = read_card(data)
    if "validation" not in card.get("splits", {}) or not card.get("classes"):
        return None
    val = load_split(data, "validation")
    if val.masks is None:
        return None
    res, _ = round_trip(backbone, val.images, val.masks, list(card["classes"]))  # a backbone: no refiner
    return {"split": "validation", **res}


def train_controlnet(data: Path, cfg: ControlNetConfig, out: Path, resume: bool | str = False) -> Path:
    """Train on the prepared train split; writes OUT/controlnet (diffusers), OUT/unet_lora, OUT/unet or
    OUT/backbone as the mode asks, OUT/checkpoints and OUT/training.json.

    `resume`: True or "latest" continues from the newest checkpoint in OUT/checkpoints (a fresh
    start if there is none), or give one checkpoint folder (OUT/checkpoints/step-N).
    """
    out = Path(out)
    if not resume and any((out / "checkpoints").glob("step-*")):
        raise SynthmedError(f"{out}: holds an interrupted run's checkpoints; add --resume latest to continue, or choose a new --out")
    check_output(out, MODEL_KIND, resume=bool(resume))
    if resume not in (False, True, "latest") and not Path(resume).is_dir():
        raise SynthmedError(f"{resume}: --resume expects 'latest' or a checkpoint folder (OUT/checkpoints/step-N)")
    changed = changed_settings(out, cfg, started_only=True) if resume else []
    if changed:
        raise SynthmedError(f"{out}: its checkpoints were trained with other settings (changed: {', '.join(changed)}); "
                            "resume with the same settings, or choose a new --out")
    if resume == "latest" and not any((out / "checkpoints").glob("step-*")):
        note(f"--resume latest: no checkpoint in {out / 'checkpoints'}, so training starts at step 0")
    if _lora_first(cfg):
        cfg = _lora_stage_first(data, cfg, out, resume)
    return _train(data, cfg, out, resume)


# Settings (dotted paths) that do not change what a training makes: how often it checkpoints, how many it keeps,
# where it logs, where the latent cache lives.
NOT_RESULT_SETTINGS = {"checkpoint_every", "keep_checkpoints", "log_with", "latent_cache", "decoder.checkpoint_every", "decoder.refiner.checkpoint_every"}


def changed_settings(out: Path, cfg: ControlNetConfig, started_only: bool = False) -> list[str]:
    """The settings (dotted keys) in which `cfg` differs from what each phase of the model folder OUT saved: the
    ControlNet's (on the LoRA stage's fused UNet, where there is one) and the LoRA stage's (prefixed 'lora-stage:').
    `started_only`: only phases with checkpoints (what a resume would continue)."""
    out = Path(out)
    first = _lora_first(cfg)
    phases = ([(out / "lora-stage", _stage_config(cfg), "lora-stage: ")] if first else []) + [(out, _after_stage(cfg, out) if first else cfg, "")]
    changed = []
    for folder, settings, prefix in phases:
        if started_only and not (any((folder / "checkpoints").glob("step-*")) or (folder / "decoder-state").exists()):
            continue
        changed += [prefix + k for k in settings_changed(folder / "train_config.yaml", settings, NOT_RESULT_SETTINGS) or []]
    return changed


def _lora_first(cfg: ControlNetConfig) -> bool:
    return bool(cfg.lora.rank and cfg.lora.stage == "before" and cfg.conditioning_mode != "text")


def _lora_stage_first(data: Path, cfg: ControlNetConfig, out: Path, resume: bool) -> ControlNetConfig:
    """Train a text-to-image LoRA (OUT/lora-stage), then train the ControlNet on its fused UNet."""
    from synthmed.models.trained import is_complete

    stage = out / "lora-stage"
    if not is_complete(stage):
        _train(data, _stage_config(cfg), stage, resume=True)
    return _after_stage(cfg, out)


def _stage_config(cfg: ControlNetConfig) -> ControlNetConfig:
    """The text-to-image LoRA stage's settings (lora.stage before)."""
    return cfg.model_copy(update={"conditioning_mode": "text", "steps": cfg.lora.steps or cfg.steps, "lora": cfg.lora.model_copy(update={"stage": "joint"}),
                                  "controlnet_init": None, "unet_decoder_lr": None, "class_weights": None, "decoder": DecoderConfig()})


def _after_stage(cfg: ControlNetConfig, out: Path) -> ControlNetConfig:
    """The ControlNet's settings after that stage: on its fused UNet."""
    return cfg.model_copy(update={"backbone": str((out / "lora-stage" / "backbone").resolve()), "lora": LoraConfig()})


def _train(data: Path, cfg: ControlNetConfig, out: Path, resume: bool) -> Path:
    import torch
    from accelerate import Accelerator

    from synthmed.models.trained import save_trained, write_record
    from synthmed.training import setup
    from synthmed.training.controlnet import latest_checkpoint, read_history, train

    text_mode = cfg.conditioning_mode == "text"
    split, prompts, cond = setup.load_inputs(data, cfg, text_mode)
    backbone = setup.load_checked_backbone(cfg, split, data)
    class_weights = setup.class_weights(data, cfg.class_weights, split.masks)
    decoder_weights = setup.decoder_weights(data, cfg, split.masks)  # every process, before anything is written
    # The schedule steps once per optimiser step: the global batch is split over processes, not multiplied.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=setup.tracker(cfg.log_with), project_dir=str(out / "logs"),
                              step_scheduler_with_optimizer=False)
    if cfg.batch_size % (cfg.grad_accum * accelerator.num_processes):
        raise SynthmedError(f"batch_size (global) must be divisible by grad_accum x processes "
                            f"({cfg.grad_accum} x {accelerator.num_processes}), but got {cfg.batch_size}")
    if accelerator.is_main_process:
        mark_output(out, MODEL_KIND)
        save_config(cfg, out / "train_config.yaml")
    accelerator.wait_for_everyone()
    accelerator.init_trackers("train", config={k: v for k, v in cfg.model_dump().items() if isinstance(v, (int, float, str, bool))},
                              init_kwargs=setup.tracker_kwargs(cfg.log_with, out / "logs"))
    attention = setup.set_attention(backbone, cfg.attention, accelerator.device)
    torch.manual_seed(cfg.seed)
    started = time.time()
    decoder = None
    if cfg.decoder.steps or cfg.decoder.refiner.steps:  # before any latent is encoded or decoded; the encoder does not change
        if accelerator.is_main_process:
            decoder = setup.tune_decoder(backbone, split, cond, cfg, decoder_weights, out / "decoder-state")
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:  # the others decode validation grids with it too
            setup.load_tuned_decoder(backbone, out / "decoder-state", cfg, cond.shape[-1])
    controlnet = None if cond is None else setup.controlnet_for(backbone, cfg, cond.shape[-1])  # cond: (N, H, W, C)
    setup.cast_frozen(backbone, cfg.mixed_precision, accelerator.device)
    data_t = setup.training_data(backbone, split, prompts, cond, cfg, accelerator)
    model = setup.build_model(backbone, controlnet, cfg)
    validate = setup.validator(data, backbone, cfg, accelerator) if cfg.validation_every else None
    lrs = {"controlnet": cfg.lr, "lora": cfg.lora.lr or cfg.lr, "unet": (cfg.unet_decoder_lr if not text_mode else cfg.unet_lr) or cfg.lr}
    with task("train " + ("text-to-image UNet" if text_mode else "controlnet"), cfg.steps) as update:
        try:
            losses = train(model, backbone, data_t, cfg, accelerator, out / "checkpoints", resume=resume, progress=update,
                           class_weights=class_weights, validate=validate, lrs=lrs)
        except FloatingPointError as exc:
            raise SynthmedError(str(exc)) from None
        except ValueError as exc:
            raise SynthmedError(f"{out}: {exc}") from None
    if accelerator.is_main_process:
        saved = save_trained(accelerator.unwrap_model(model).eval(), backbone, cfg, out)
        last = latest_checkpoint(out / "checkpoints")
        runs = read_history(last[1] if last else None)["runs"]
        record = setup.training_record(cfg, data, split, backbone, data_t, saved, losses, started, accelerator, attention, runs)
        record["decoder"] = decoder
        write_record(out, record, saved, {"environment": environment()})
    accelerator.wait_for_everyone()
    accelerator.end_training()  # after the last barrier: it closes the process group
    return out

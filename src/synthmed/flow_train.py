"""`synthmed train controlnet` as a flow function: load and check everything, build, train, save.

Part of the edge (like flow.py): it turns paths and a config into built objects for
`training.controlnet.train`, and writes the outputs. Everything that can be wrong with the
inputs is checked before the first training step.
"""

from __future__ import annotations

import time
from pathlib import Path

from synthmed.config import ControlNetConfig, LoraConfig, save_config
from synthmed.io import SynthmedError, atomic_dir, check_new_output, write_json
from synthmed.progress import task


def train_controlnet(data: Path, cfg: ControlNetConfig, out: Path, resume: bool | str = False) -> Path:
    """Train on the prepared train split; writes OUT/controlnet (diffusers), OUT/unet_lora, OUT/unet or
    OUT/backbone as the mode asks, OUT/checkpoints and OUT/training.json.

    `resume`: True or "latest" continues from the newest checkpoint in OUT/checkpoints (a fresh
    start if there is none), or give one checkpoint folder (OUT/checkpoints/step-N).
    """
    out = Path(out)
    if not resume and any((out / "checkpoints").glob("step-*")):
        raise SynthmedError(f"{out}: holds an interrupted run's checkpoints; add --resume latest to continue, or choose a new --out")
    check_new_output(out, allow_resume=bool(resume))
    if resume not in (False, True, "latest") and not Path(resume).is_dir():
        raise SynthmedError(f"{resume}: --resume expects 'latest' or a checkpoint folder (OUT/checkpoints/step-N)")
    if cfg.lora.rank and cfg.lora.stage == "before" and cfg.conditioning_mode != "text":
        cfg = _lora_stage_first(data, cfg, out, resume)
    return _train(data, cfg, out, resume)


def _lora_stage_first(data: Path, cfg: ControlNetConfig, out: Path, resume: bool) -> ControlNetConfig:
    """Train a text-to-image LoRA (OUT/lora-stage), then train the ControlNet on its fused UNet."""
    stage = out / "lora-stage"
    if not (stage / "backbone" / "model_index.json").is_file():
        first = cfg.model_copy(update={"conditioning_mode": "text", "steps": cfg.lora.steps or cfg.steps, "lora": cfg.lora.model_copy(update={"stage": "joint"}),
                                       "controlnet_init": None, "unet_decoder_lr": None, "class_weights": None})
        _train(data, first, stage, resume=True)
    return cfg.model_copy(update={"backbone": str((stage / "backbone").resolve()), "lora": LoraConfig()})


def _train(data: Path, cfg: ControlNetConfig, out: Path, resume: bool) -> Path:
    import torch
    from accelerate import Accelerator

    from synthmed.flow import _mark_run, environment
    from synthmed.io import folder_hash

    text_mode = cfg.conditioning_mode == "text"
    split, prompts, cond = _load_inputs(data, cfg, text_mode)
    backbone = _load_checked_backbone(cfg, split, data)
    class_weights = _class_weights(data, cfg.class_weights, split.masks)
    # The schedule steps once per optimiser step: the global batch is split over processes, not multiplied.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=_tracker(cfg.log_with), project_dir=str(out / "logs"),
                              step_scheduler_with_optimizer=False)
    if cfg.batch_size % (cfg.grad_accum * accelerator.num_processes):
        raise SynthmedError(f"batch_size (global) must be divisible by grad_accum x processes "
                            f"({cfg.grad_accum} x {accelerator.num_processes}), but got {cfg.batch_size}")
    if accelerator.is_main_process:
        _mark_run(out, "controlnet")
        save_config(cfg, out / "train_config.yaml")
    accelerator.wait_for_everyone()
    accelerator.init_trackers("train", config={k: v for k, v in cfg.model_dump().items() if isinstance(v, (int, float, str, bool))})
    attention = _set_attention(backbone, cfg.attention, accelerator.device)
    torch.manual_seed(cfg.seed)
    started = time.time()
    controlnet = None if cond is None else _controlnet(backbone, cfg, cond.shape[-1])  # cond: (N, H, W, C)
    _cast_frozen(backbone, cfg.mixed_precision, accelerator.device)
    data_t = _training_data(backbone, split, prompts, cond, cfg)
    model = _build_model(backbone, controlnet, cfg)
    validate = _validator(data, backbone, cfg, accelerator) if cfg.validation_every else None
    from synthmed.training.controlnet import train

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
        saved = _save_outputs(accelerator.unwrap_model(model).eval(), backbone, cfg, out)
        record = _training_record(cfg, data, split, backbone, data_t, saved, losses, started, accelerator, attention)
        record["output_hashes"] = {part: folder_hash(out / folder) for part, folder in saved.items()}
        record["controlnet_hash"] = record["output_hashes"].get("controlnet")
        write_json(out / "training.json", record | {"environment": environment()})
    accelerator.wait_for_everyone()
    accelerator.end_training()  # after the last barrier: it closes the process group
    return out


def _load_inputs(data: Path, cfg: ControlNetConfig, text_mode: bool):
    """The train split, its prompts as the model trains on them, and conditioning (None in text mode)."""
    from synthmed.data.prepared import load_conditioning, load_split

    split = load_split(data, "train", need_masks=cfg.class_weights is not None)  # class weights act through the masks
    cond = None if text_mode else load_conditioning(split)
    return split, trained_prompts(split, cfg.conditioning_mode, cfg.prompt_source, cfg.label_prompt), cond


def trained_prompts(split, conditioning_mode: str, prompt_source: str, label_prompt: str) -> list[str]:
    """The prompts a model sees for a split: empty (mask mode), label_prompt filled from each row, or the data set's.

    Training, validation and `generate` (from training.json's record) all use this one rule.
    """
    if conditioning_mode == "mask":
        return [""] * len(split)
    if prompt_source == "text":
        return split.prompts
    where = split.root / split.split / "metadata.jsonl"
    if any(r.get("label") is None for r in split.rows):
        raise SynthmedError(f"{where}: prompt_source label, but some samples have no label")
    try:
        return [label_prompt.format(**r) for r in split.rows]
    except KeyError as exc:
        raise SynthmedError(f"{where}: label_prompt field {exc} is not in metadata.jsonl") from None


def _load_checked_backbone(cfg: ControlNetConfig, split, data: Path):
    """The frozen backbone, after checking that the training size fits its downsampling."""
    from synthmed.models.backbone import load_backbone
    from synthmed.models.controlnet import parse_depth

    backbone = load_backbone(cfg.backbone).freeze()
    size = tuple(cfg.augment.crop) if cfg.augment.crop else tuple(split.images.shape[1:3])
    factor = backbone.vae_scale_factor * 2 ** (len(backbone.unet.config.down_block_types) - 1)
    if size[0] % factor or size[1] % factor:
        raise SynthmedError(f"{data}: training size {size[0]}x{size[1]} is not divisible by {factor} (the backbone's VAE factor "
                            f"{backbone.vae_scale_factor} x UNet downsampling); prepare with --size or set augment.crop")
    if cfg.augment.crop and (size[0] > split.images.shape[1] or size[1] > split.images.shape[2]):
        raise SynthmedError(f"{data}: augment.crop {size} is larger than the images {split.images.shape[1:3]}")
    try:
        parse_depth(cfg.depth, len(backbone.unet.config.down_block_types))
    except ValueError as exc:
        raise SynthmedError(f"depth: {exc}") from None
    return backbone


def _class_weights(data: Path, weights: dict | None, masks):
    """(K + 1,) loss weights per mask code from {class name: weight}; unnamed classes weigh 1."""
    if not weights:
        return None
    import torch

    from synthmed.data.prepared import read_card

    names = ["background", *read_card(data).get("classes", [])]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise SynthmedError(f"{data}: class_weights names {unknown}, which the data set does not have (classes: {', '.join(names)})")
    if masks is not None and int(masks.max()) >= len(names):
        raise SynthmedError(f"{data}: masks hold class code {int(masks.max())}, beyond the card's {len(names) - 1} classes")
    return torch.tensor([float(weights.get(n, 1.0)) for n in names])


def _tracker(name: str | None):
    """The accelerate tracker to log to, if its package is installed (TensorBoard is a dependency)."""
    import importlib.util

    if not name:
        return None
    package = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(name)
    if package is None:
        raise SynthmedError(f"log_with: unknown tracker {name!r} (tensorboard, wandb, mlflow)")
    if importlib.util.find_spec(package) is None:
        raise SynthmedError(f"log_with: {name} is not installed (pip install {package})")
    return name


def _set_attention(backbone, kind: str, device) -> str:
    """PyTorch SDPA (diffusers' default) or xFormers; returns what is in use."""
    import importlib.util

    want_xformers = kind == "xformers" or (kind == "auto" and device.type == "cuda" and importlib.util.find_spec("xformers") is not None)
    if not want_xformers:
        return "sdpa"
    if importlib.util.find_spec("xformers") is None:
        raise SynthmedError("attention: xformers is not installed (pip install xformers), use sdpa")
    backbone.unet.enable_xformers_memory_efficient_attention()
    return "xformers"


def _cast_frozen(backbone, precision: str, device) -> None:
    """Frozen VAE, text encoder and UNet in fp16/bf16 under mixed precision (trained weights stay fp32)."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    for m in backbone.modules().values():
        _to(m, device, dtype)


def _to(module, device=None, dtype=None):
    """Move/cast only what differs (diffusers warns on every dtype cast, even a no-op one)."""
    if dtype is not None and module.dtype != dtype:
        return module.to(device=device, dtype=dtype)
    return module.to(device) if device is not None else module


def _training_data(backbone, split, prompts, cond, cfg: ControlNetConfig):
    from synthmed.training.batches import build_training_data

    aug = cfg.augment
    cache = cfg.cache_latents if cfg.cache_latents is not None else (aug.crop is None and tuple(aug.scale) == (1.0, 1.0))
    with task("cache latents + prompts" if cache else "prepare training data", 1) as update:
        try:
            out = build_training_data(backbone, split.images, cond, prompts, masks=split.masks, cache=cache, flips=aug.flips,
                                      crop=tuple(aug.crop) if aug.crop else None, scale=tuple(aug.scale))
        except ValueError as exc:
            raise SynthmedError(f"cache_latents: {exc}") from None
        update(1)
    return out


def _controlnet(backbone, cfg: ControlNetConfig, channels: int):
    """The ControlNet (fp32), copied from the fp32 UNet or warm-started, restricted to cfg.depth."""
    from synthmed.models.controlnet import build_controlnet

    init = Path(cfg.controlnet_init) if cfg.controlnet_init else None
    return build_controlnet(backbone.unet, backbone.vae_scale_factor, channels, cfg.depth, init)


def _build_model(backbone, controlnet, cfg: ControlNetConfig):
    """ControlledUNet with exactly the parts the config trains set trainable (in fp32)."""
    import torch

    from synthmed.models.controlnet import ControlledUNet
    from synthmed.models.lora import add_lora

    unet = backbone.unet
    if controlnet is not None:
        _to(controlnet, unet.device, torch.float32)
    if cfg.lora.rank:
        add_lora(unet, cfg.lora.rank, cfg.lora.alpha)
    elif controlnet is None:  # text mode without LoRA: the whole UNet
        _to(unet, dtype=torch.float32).requires_grad_(True)
    if cfg.unet_decoder_lr and controlnet is not None:
        for part in (unet.up_blocks, unet.conv_norm_out, unet.conv_out):
            part.to(torch.float32).requires_grad_(True)  # plain nn.Modules: no diffusers warning
    for m in (controlnet, unet):
        if m is None:
            continue
        if cfg.gradient_checkpointing:
            m.enable_gradient_checkpointing()  # the frozen UNet too: gradients pass through its activations
        if cfg.channels_last:
            m.to(memory_format=torch.channels_last)
        if cfg.compile:
            m.compile()
    return ControlledUNet(unet, controlnet).train()


def _save_outputs(model, backbone, cfg: ControlNetConfig, out: Path) -> dict:
    """Write the trained parts as diffusers folders; returns {part: folder name}."""
    import torch

    from synthmed.models.lora import save_lora

    saved = {}
    model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors (channels_last runs)
    if model.controlnet is not None:
        with atomic_dir(out / "controlnet") as tmp:
            model.controlnet.save_pretrained(tmp, safe_serialization=True)
        saved["controlnet"] = "controlnet"
    if cfg.lora.rank:
        with atomic_dir(out / "unet_lora") as tmp:
            save_lora(model.unet, tmp)
        saved["unet_lora"] = "unet_lora"
    if cfg.conditioning_mode == "text":
        if cfg.lora.rank:
            model.unet.fuse_lora(lora_scale=1.0)
            model.unet.unload_lora()
        for m in backbone.modules().values():
            _to(m, dtype=torch.float32)
        with atomic_dir(out / "backbone") as tmp:
            backbone.save(tmp, recipe={"made_by": "synthmed train controlnet --conditioning-mode text", "base": cfg.backbone, "lora_fused": bool(cfg.lora.rank)})
        saved["backbone"] = "backbone"
    elif cfg.unet_decoder_lr:
        with atomic_dir(out / "unet") as tmp:
            _to(model.unet, dtype=torch.float32).save_pretrained(tmp, safe_serialization=True)
        saved["unet"] = "unet"
    return saved


def _training_record(cfg, data, split, backbone, data_t, saved, losses, started, accelerator, attention) -> dict:
    return {
        "backbone": cfg.backbone,
        "backbone_source": backbone.source,
        "backbone_native_resolution": backbone.resolution,
        "prediction_type": backbone.scheduler.config.prediction_type,
        "conditioning_mode": cfg.conditioning_mode,
        "prompt_source": cfg.prompt_source,
        "label_prompt": cfg.label_prompt,
        "outputs": saved,
        "data": str(Path(data).resolve()),
        "data_split": "train",
        "n_train": len(split),
        "train_ids": split.ids,
        "training_size": list(data_t.size),
        "conditioning_channels": None if data_t.conditioning is None else int(data_t.conditioning.shape[1]),
        "image_channels": _image_channels(data),
        "vae_channels": "grey images enter the 3-channel VAE as R = G = B; generated images are saved as the channel mean, "
                        "with the colour residual recorded per sample" if _image_channels(data) == 1 else "RGB",
        "depth": cfg.depth if "controlnet" in saved else None,
        "latents": "cached once per dihedral view" if data_t.cached else "encoded every step (augmentation on the fly)",
        "views": list(data_t.views),
        "lora": cfg.lora.model_dump() if cfg.lora.rank else None,
        "ema": bool(cfg.ema_decay),
        "attention": attention,
        "mixed_precision": cfg.mixed_precision,
        "steps": cfg.steps,
        "last_losses": losses[-50:],
        "mean_loss_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "seconds": round(time.time() - started, 1),
        "processes": accelerator.num_processes,
    }


def _image_channels(data: Path) -> int | None:
    """The data set's channel count from its card (1: greyscale), None where it mixes grey and RGB."""
    from synthmed.data.prepared import read_card

    return read_card(data).get("channels")


def _validator(data: Path, backbone, cfg: ControlNetConfig, accelerator):
    """validate(model, step): validation loss and a grid (mask | real | generated) to the trackers."""
    from synthmed.training.validation import validation_grid, validation_loss

    from synthmed.data.prepared import load_conditioning, load_split
    from synthmed.training.batches import build_training_data

    vsplit = load_split(data, "validation", limit=cfg.validation_samples)
    vcond = None if cfg.conditioning_mode == "text" else load_conditioning(vsplit)
    vprompts = trained_prompts(vsplit, cfg.conditioning_mode, cfg.prompt_source, cfg.label_prompt)
    vdata = build_training_data(backbone, vsplit.images, vcond, vprompts, flips=False)

    def validate(model, step: int) -> None:
        with accelerator.autocast():
            loss = validation_loss(model, backbone, vdata, cfg.seed)
            grid = validation_grid(model, backbone, vsplit.images, vcond, vprompts, cfg.validation_steps, cfg.seed)
        accelerator.log({"validation_loss": loss}, step=step)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": grid[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"validation": [grid]}, step=step)

    return validate

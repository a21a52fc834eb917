"""Setting up a ControlNet (or text-mode UNet) training run: inputs checked and loaded, the frozen backbone,
the trained modules, the training data, the validator and the record written to training.json.

`pipelines/train.py` wires these together around `training.controlnet.train`; everything that can be wrong
with the inputs is checked here before the first training step.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from synthmed.config import ControlNetConfig
from synthmed.core.io import SynthmedError
from synthmed.core.progress import task
from synthmed.data.prompts import trained_prompts
from synthmed.models.trained import cast


def load_inputs(data: Path, cfg: ControlNetConfig, text_mode: bool):
    """The train split, its prompts as the model trains on them, and conditioning (None in text mode)."""
    from synthmed.data.prepared import load_conditioning, load_split

    weighted = cfg.class_weights is not None or (cfg.decoder.steps and cfg.decoder.class_weights is not None)
    split = load_split(data, "train", need_masks=bool(weighted))  # class weights act through the masks
    cond = None if text_mode else load_conditioning(split)
    return split, trained_prompts(split, cfg.conditioning_mode, cfg.prompt_source, cfg.label_prompt), cond


def load_checked_backbone(cfg: ControlNetConfig, split, data: Path):
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


def class_weights(data: Path, weights: dict | None, masks):
    """(K + 1,) loss weights per mask code from {class name: weight}; unnamed classes weigh 1."""
    if not weights:
        return None
    import torch

    from synthmed.data.prepared import read_card

    names = ["background", *read_card(data).get("classes", [])]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise SynthmedError(f"{data}: class_weights names {unknown}, which the data set does not have (classes: {', '.join(names)})")
    top = -1 if masks is None else max((int(masks[i:i + 256].max()) for i in range(0, len(masks), 256)), default=-1)  # by chunks: a DiskArray
    if top >= len(names):
        raise SynthmedError(f"{data}: masks hold class code {top}, beyond the card's {len(names) - 1} classes")
    return torch.tensor([float(weights.get(n, 1.0)) for n in names])


def decoder_weights(data: Path, cfg: ControlNetConfig, masks):
    """The checked per-class weights of the decoder fine-tune and the refiner (None: uniform, or neither); one-line errors."""
    d = cfg.decoder
    if not (d.steps or d.refiner.steps):
        return None
    if cfg.conditioning_mode == "text":
        what = "decoder.steps: the VAE decoder is fine-tuned" if d.steps else "decoder.refiner.steps: the refiner paints from the conditioning"
        raise SynthmedError(f"{what} for ControlNet training; conditioning_mode text has no conditioning images (set it to 0)")
    return class_weights(data, d.class_weights, masks)


def tune_decoder(backbone, split, cond, cfg: ControlNetConfig, weights, state_dir: Path) -> dict:
    """Fine-tune the VAE decoder, then train the conditioned refiner (backbone.refiner), on the train split (cfg.decoder,
    `weights` from decoder_weights, `cond` the split's conditioning), before anything is encoded."""
    from synthmed.training.decoder import finetune_decoder, train_refiner

    d, masks = cfg.decoder, split.masks if weights is not None else None
    record = {"steps": d.steps, "class_weights": d.class_weights, "data_split": "train"}
    if d.steps:
        with task("fine-tune VAE decoder", d.steps) as update:
            losses = finetune_decoder(backbone, split.images, masks, weights, SimpleNamespace(**d.model_dump(), seed=cfg.seed), update, state_dir)
        record["final_loss"] = losses[-1] if losses else None
    if d.refiner.steps:
        run = SimpleNamespace(**d.refiner.model_dump(), focus_share=d.focus_share, seed=cfg.seed)
        latents = refiner_latents(backbone, split.images, cfg)
        with task("train conditioned refiner", d.refiner.steps) as update:
            backbone.refiner, losses, trained = train_refiner(backbone, split.images, masks, cond, weights, run, update, state_dir, latents=latents)
        record["refiner"] = {**d.refiner.model_dump(), "final_loss": losses[-1] if losses else None, "cached_latents": latents is not None, **trained}
    return record


def caches_latents(cfg: ControlNetConfig) -> bool:
    """Whether training reads cached latents: as set, else whenever no random crop or rescale makes every view new."""
    aug = cfg.augment
    return cfg.cache_latents if cfg.cache_latents is not None else (aug.crop is None and tuple(aug.scale) == (1.0, 1.0))


def latent_root(cfg: ControlNetConfig) -> Path | None:
    """Where the latent cache lives (None: in memory, or no cache)."""
    from synthmed.training.latent_cache import default_root

    if not caches_latents(cfg) or cfg.latent_cache == "memory":
        return None
    return default_root() if cfg.latent_cache == "auto" else Path(cfg.latent_cache)


def refiner_latents(backbone, images, cfg: ControlNetConfig):
    """The images' latents in the 8 dihedral views from the on-disk latent cache (encoded now if it lacks them), for a
    refiner whose crops are whole images; None otherwise (its steps encode their own crops). With the ControlNet's
    own views all 8 (square images, flips on), this is the very cache the ControlNet then reads."""
    from synthmed.training.batches import encode_batch
    from synthmed.training.decoder import whole_image_crops
    from synthmed.training.latent_cache import cached_latents

    root = latent_root(cfg)
    if root is None or not whole_image_crops(images.shape[1:3], cfg.decoder.refiner.crop):
        return None
    with task("encode latents for the cache", 1) as update:
        store, info = cached_latents(backbone, images, tuple(range(8)), root, progress=update, batch_size=encode_batch(*images.shape[1:3]))
        if info["reused"]:
            update(1)
    return store


def load_tuned_decoder(backbone, state_dir: Path, cfg: ControlNetConfig, cond_channels: int) -> None:
    """The decoder and refiner that tune_decoder left in `state_dir` (their final checkpoints), into `backbone`."""
    import torch

    from synthmed.models.refiner import new_refiner
    from synthmed.training.decoder import DecoderParts

    if cfg.decoder.steps:
        state = torch.load(Path(state_dir) / "decoder.pt", map_location="cpu", weights_only=True)
        DecoderParts(backbone.vae).load_state_dict(state["model"])
    if cfg.decoder.refiner.steps:
        r = cfg.decoder.refiner
        backbone.refiner = new_refiner(cond_channels, r.width, r.depth)
        backbone.refiner.load_state_dict(torch.load(Path(state_dir) / "refiner.pt", map_location="cpu", weights_only=True)["model"])
        backbone.refiner.eval().requires_grad_(False)


def tracker(name: str | None):
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


def tracker_kwargs(name: str | None, logs: Path) -> dict:
    """init_kwargs that keep each tracker's record on this machine, under OUT/logs, unless the user's environment
    names a destination: W&B offline (WANDB_MODE=online uploads; `wandb sync` later), MLflow in a SQLite file
    (MLFLOW_TRACKING_URI names a server instead; `mlflow ui --backend-store-uri sqlite:///OUT/logs/mlflow.db`)."""
    import os

    logs = Path(logs).resolve()
    if name == "wandb":
        return {"wandb": {"dir": str(logs), "mode": os.environ.get("WANDB_MODE", "offline")}}
    if name == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            logs.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{logs / 'mlflow.db'}")
        return {"mlflow": {"logging_dir": str(logs / "mlflow-artifacts")}}
    return {}


def set_attention(backbone, kind: str, device) -> str:
    """PyTorch SDPA (diffusers' default) or xFormers; returns what is in use."""
    import importlib.util

    want_xformers = kind == "xformers" or (kind == "auto" and device.type == "cuda" and importlib.util.find_spec("xformers") is not None)
    if not want_xformers:
        return "sdpa"
    if importlib.util.find_spec("xformers") is None:
        raise SynthmedError("attention: xformers is not installed (pip install xformers), use sdpa")
    backbone.unet.enable_xformers_memory_efficient_attention()
    return "xformers"


def cast_frozen(backbone, precision: str, device) -> None:
    """Frozen VAE, text encoder and UNet in fp16/bf16 under mixed precision (trained weights stay fp32)."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    for m in backbone.modules().values():
        cast(m, device, dtype)


def training_data(backbone, split, prompts, cond, cfg: ControlNetConfig, accelerator=None):
    """The loop's data; cached latents on disk by default, each image encoded once across the processes."""
    from synthmed.training.batches import build_training_data

    aug, cache, where = cfg.augment, caches_latents(cfg), latent_root(cfg)
    processes = (0, 1, lambda: None) if accelerator is None else (accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)
    label = "encode latents for the cache" + (f" (process {processes[0] + 1}/{processes[1]})" if processes[1] > 1 else "")
    with task(label if cache else "prepare training data", 1) as update:
        try:
            out = build_training_data(backbone, split.images, cond, prompts, masks=split.masks, cache=cache, flips=aug.flips, views=aug.views,
                                      crop=tuple(aug.crop) if aug.crop else None, scale=tuple(aug.scale), cache_dir=where,
                                      processes=processes, progress=update)
        except ValueError as exc:
            raise SynthmedError(f"cache_latents: {exc}") from None
        if out.cache_info is None or out.cache_info["reused"]:  # work that reports no chunks: one line when done
            update(1)
    return out


def controlnet_for(backbone, cfg: ControlNetConfig, channels: int):
    """The ControlNet (fp32), copied from the fp32 UNet or warm-started, restricted to cfg.depth."""
    from synthmed.models.controlnet import build_controlnet

    init = Path(cfg.controlnet_init) if cfg.controlnet_init else None
    return build_controlnet(backbone.unet, backbone.vae_scale_factor, channels, cfg.depth, init)


def build_model(backbone, controlnet, cfg: ControlNetConfig):
    """ControlledUNet with exactly the parts the config trains set trainable (in fp32)."""
    import torch

    from synthmed.models.controlnet import ControlledUNet
    from synthmed.models.lora import add_lora

    unet = backbone.unet
    if controlnet is not None:
        cast(controlnet, unet.device, torch.float32)
    if cfg.lora.rank:
        add_lora(unet, cfg.lora.rank, cfg.lora.alpha)
    elif controlnet is None:  # text mode without LoRA: the whole UNet
        cast(unet, dtype=torch.float32).requires_grad_(True)
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


def training_record(cfg, data, split, backbone, data_t, saved, losses, started, accelerator, attention, runs=()) -> dict:
    """training.json. `losses` from step 0; `runs`: each invocation's steps and loop seconds (a resumed training has
    several); `seconds` is the earlier invocations' loop time plus this invocation's whole wall time."""
    runs = list(runs)
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
        "image_channels": image_channels(data),
        "vae_channels": "grey images enter the 3-channel VAE as R = G = B; generated images are saved as the channel mean, "
                        "with the colour residual recorded per sample" if image_channels(data) == 1 else "RGB",
        "depth": cfg.depth if "controlnet" in saved else None,
        "latents": "cached once per dihedral view" if data_t.cached else "encoded every step (augmentation on the fly)",
        "latent_cache": data_t.cache_info,
        "views": list(data_t.views),
        "lora": cfg.lora.model_dump() if cfg.lora.rank else None,
        "ema": bool(cfg.ema_decay),
        "attention": attention,
        "mixed_precision": cfg.mixed_precision,
        "steps": cfg.steps,
        "last_losses": losses[-50:],
        "mean_loss_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "seconds": round(sum(r["seconds"] for r in runs[:-1]) + time.time() - started, 1),
        "runs": runs,
        "resumed": len(runs) > 1,
        "processes": accelerator.num_processes,
    }


def image_channels(data: Path) -> int | None:
    """The data set's channel count from its card (1: greyscale), None where it mixes grey and RGB."""
    from synthmed.data.prepared import read_card

    return read_card(data).get("channels")


def validator(data: Path, backbone, cfg: ControlNetConfig, accelerator):
    """validate(model, step): validation loss and a grid (mask | real | generated) to the trackers."""
    from synthmed.training.validation import validation_grid, validation_loss

    import numpy as np

    from synthmed.data.prepared import load_conditioning, load_split
    from synthmed.training.batches import build_training_data

    vsplit = load_split(data, "validation", limit=cfg.validation_samples)
    vsplit.images = np.asarray(vsplit.images)  # a few fixed samples: in memory even when the split is read from disk
    vcond = None if cfg.conditioning_mode == "text" else np.asarray(load_conditioning(vsplit))
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
            elif tracker.name == "mlflow":  # accelerate's MLflow tracker has no log_images
                if accelerator.is_main_process:
                    import mlflow

                    mlflow.log_image(grid, key="validation", step=step)
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"validation": [grid]}, step=step)

    return validate

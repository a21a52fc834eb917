"""The trained-model folder that `synthmed train controlnet` writes, and the one reader of it.

MODEL/training.json (written last: its presence means complete) lists the trained parts in `outputs`:
`controlnet/` (diffusers ControlNetModel), `unet_lora/` (diffusers LoRA format), `unet/` (a trained
UNet decoder), `vae/` (the VAE with a fine-tuned decoder, `controlnet.decoder`), `refiner/` (the conditioned
refiner, `controlnet.decoder.refiner`: models/refiner.py) or, for conditioning_mode text, `backbone/` (a whole pipeline folder), each with
safetensors weights and its content hash in `output_hashes`.
"""

from __future__ import annotations

from pathlib import Path

from synthmed.core.io import SynthmedError, atomic_dir, folder_hash, read_json, short_hash, write_json

RECORD = "training.json"


def read_training(model: Path) -> dict:
    """MODEL/training.json (a one-line error naming the file if it is missing or corrupt)."""
    if Path(model).is_dir() and not (Path(model) / RECORD).is_file():
        raise SynthmedError(f"{model}: not a trained model folder (no {RECORD}: give the --out of `synthmed train controlnet`)")
    return read_json(Path(model) / RECORD)


def has_controlnet(training: dict) -> bool:
    """Whether a trained model has a ControlNet (conditioning_mode text trains the UNet alone: text-only sampling)."""
    return "controlnet" in training.get("outputs", {"controlnet": "controlnet"})


def check_conditioning(model: Path, training: dict, card: dict, where: Path) -> None:
    """Refuse, before any sampling, a data set whose conditioning images have another channel count than the
    ones the model's ControlNet was trained on (`card`: the data set's dataset.json)."""
    want = training.get("conditioning_channels") if has_controlnet(training) else None
    cond = card.get("conditioning") or {}
    have = len(cond.get("channel_names") or [])
    if want and have and want != have:
        raise SynthmedError(f"{where}: conditioning has {have} channel(s) ({', '.join(cond.get('builders') or [])}) but the model {model} "
                            f"was trained on {want}; use a data set prepared with the --conditioning it was trained on")


def is_complete(model: Path) -> bool:
    """A finished model folder: training.json written, and every part it lists present with its weights."""
    model = Path(model)
    if not (model / RECORD).is_file():
        return False
    try:
        outputs = read_training(model).get("outputs", {"controlnet": "controlnet"})
    except SynthmedError:
        return False
    return all(any((model / folder).glob("**/*.safetensors")) for folder in outputs.values())


def model_hash(model: Path, training: dict) -> str:
    """The provenance hash of a trained model: the ControlNet's, else a hash over every trained part's."""
    parts = training.get("output_hashes") or {}
    if training.get("controlnet_hash"):
        return training["controlnet_hash"]
    return short_hash(repr(sorted(parts.items()))) if parts else folder_hash(Path(model) / "controlnet")


def shipped_hash(name: str) -> str | None:
    """Content hash of a shipped backbone preset (None for presets that are not shipped)."""
    from synthmed.models.backbone import shipped_backbone_dir

    folder = shipped_backbone_dir(name)
    return folder_hash(folder) if folder else None


def backbone_hash(bb, name: str) -> str | None:
    """Content hash of the backbone a model was loaded on: its folder's, or the shipped preset's."""
    return folder_hash(Path(bb.source)) if Path(bb.source).is_dir() else shipped_hash(name)


def trained_backbone(bb, model: Path, training: dict):
    """The backbone as training left it: UNet LoRA fused in, or the unlocked UNet decoder; a fine-tuned VAE decoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from synthmed.models.lora import load_lora

    outputs = training.get("outputs", {})
    if "unet" in outputs:
        bb.unet = UNet2DConditionModel.from_pretrained(Path(model) / outputs["unet"], use_safetensors=True)
    if "unet_lora" in outputs:
        load_lora(bb.unet, Path(model) / outputs["unet_lora"])
    if "vae" in outputs:
        bb.vae = AutoencoderKL.from_pretrained(Path(model) / outputs["vae"], use_safetensors=True)
    if "refiner" in outputs:
        from synthmed.models.refiner import load_refiner

        bb.refiner = load_refiner(Path(model) / outputs["refiner"])
    return bb


def load_trained(model: Path, training: dict, backbone: str | None = None):
    """(frozen backbone with the trained UNet parts, ControlNet or None, backbone name) of a model and its training record."""
    from synthmed.models.backbone import load_backbone
    from synthmed.models.controlnet import load_controlnet

    model = Path(model)
    name = backbone or training["backbone"]
    bb = trained_backbone(load_backbone(name), model, training).freeze()
    controlnet = load_controlnet(model / "controlnet") if has_controlnet(training) else None
    return bb, controlnet, name


def cast(module, device=None, dtype=None):
    """Move/cast only what differs (diffusers warns on every dtype cast, even a no-op one)."""
    if dtype is not None and module.dtype != dtype:
        return module.to(device=device, dtype=dtype)
    return module.to(device) if device is not None else module


def save_trained(model, backbone, cfg, out: Path) -> dict:
    """Write the trained parts of a ControlledUNet as diffusers folders; returns {part: folder name}."""
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
            cast(m, dtype=torch.float32)
        with atomic_dir(out / "backbone") as tmp:
            backbone.save(tmp, recipe={"made_by": "synthmed train controlnet --conditioning-mode text", "base": cfg.backbone, "lora_fused": bool(cfg.lora.rank)})
        saved["backbone"] = "backbone"
    elif cfg.unet_decoder_lr:
        with atomic_dir(out / "unet") as tmp:
            cast(model.unet, dtype=torch.float32).save_pretrained(tmp, safe_serialization=True)
        saved["unet"] = "unet"
    if cfg.decoder.steps and cfg.conditioning_mode != "text":  # the whole VAE: its encoder is the backbone's, unchanged
        with atomic_dir(out / "vae") as tmp:
            cast(backbone.vae, dtype=torch.float32).save_pretrained(tmp, safe_serialization=True)
        saved["vae"] = "vae"
    if backbone.refiner is not None and cfg.conditioning_mode != "text":
        from synthmed.models.refiner import save_refiner

        with atomic_dir(out / "refiner") as tmp:
            save_refiner(backbone.refiner, tmp)
        saved["refiner"] = "refiner"
    return saved


def write_record(out: Path, record: dict, saved: dict, tail: dict) -> dict:
    """training.json, last (its presence marks the folder complete): the record, every saved part's content hash, then `tail`."""
    record = {**record, "output_hashes": {part: folder_hash(Path(out) / folder) for part, folder in saved.items()}}
    record["controlnet_hash"] = record["output_hashes"].get("controlnet")
    record |= tail
    write_json(Path(out) / RECORD, record)
    return record

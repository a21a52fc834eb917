"""`synthmed train backbone` and `synthmed train controlnet`: options -> config -> one pipeline call."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from synthmed.cli.app import command, given, train_app
from synthmed.core.io import SynthmedError


@train_app.command("backbone", short_help="Pretrain a backbone preset on unlabelled images")
@command
def train_backbone(
    data: Path = typer.Option(..., "--data", help="prepared data set with an 'unlabelled' split"),
    out: Path = typer.Option(..., "--out", help="output diffusers pipeline folder"),
    preset: Optional[str] = typer.Option(None, help="architecture preset (default tiny)"),
    vae_steps: Optional[int] = typer.Option(None, help="default 1500"),
    unet_steps: Optional[int] = typer.Option(None, help="default 3000"),
    seed: Optional[int] = typer.Option(None, help="default 0"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoints in OUT.partial"),
):
    """Pretrain a backbone preset on unlabelled images (how the shipped tiny backbone was made)."""
    from synthmed.config import BackboneConfig, overrides
    from synthmed.models.registry import PRESETS
    from synthmed.pipelines import train_backbone as run_train_backbone

    cfg = overrides(BackboneConfig, given(preset=preset, vae_steps=vae_steps, unet_steps=unet_steps, seed=seed), [])
    if cfg.preset not in PRESETS:
        raise SynthmedError(f"unknown preset {cfg.preset!r} (known: {', '.join(sorted(PRESETS))})")
    folder = run_train_backbone(data, cfg, out, resume=resume)
    typer.echo(f"wrote {folder}")


@train_app.command("controlnet", short_help="Train a ControlNet (or the UNet) on a prepared set")
@command
def train_controlnet(
    data: Path = typer.Option(..., "--data", help="prepared data set (its train split is used)"),
    out: Path = typer.Option(..., "--out", help="output folder: controlnet/ (or backbone/, unet_lora/, unet/), checkpoints/, training.json"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of training settings (the `controlnet:` section of a run config); flags override it"),
    backbone: Optional[str] = typer.Option(None, help="tiny | sd15 | sd21 | sd21-base, a diffusers folder, a single-file .safetensors, or a hub id (local cache)"),
    steps: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, help="global batch (over processes and --set grad_accum=N)"),
    lr: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    conditioning_mode: Optional[str] = typer.Option(None, help="both | mask (empty prompts) | text (no ControlNet: fine-tune the UNet)"),
    depth: Optional[str] = typer.Option(None, help="deep | shallow:K | mid"),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank on the backbone UNet (0: none)"),
    mixed_precision: Optional[str] = typer.Option(None, help="no | fp16 | bf16"),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="any setting KEY=VALUE, dotted for nested ones (repeatable), e.g. -s lora.stage=before -s augment.crop=[48,48]"),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' (the newest checkpoint in --out) or a checkpoint folder"),
):
    """Train a ControlNet (or, --conditioning-mode text, the UNet) against the frozen backbone."""
    from synthmed.config import ControlNetConfig, load_yaml_config, overrides
    from synthmed.pipelines import train_controlnet as run_train_controlnet

    base = load_yaml_config(config, ControlNetConfig).model_dump() if config else {}
    base |= given(backbone=backbone, steps=steps, batch_size=batch_size, lr=lr, seed=seed, conditioning_mode=conditioning_mode,
                  depth=depth, mixed_precision=mixed_precision)
    if lora_rank is not None:
        base.setdefault("lora", {})["rank"] = lora_rank
    cfg = overrides(ControlNetConfig, base, set_)
    typer.echo(f"wrote {run_train_controlnet(data, cfg, out, resume=resume or False)}")

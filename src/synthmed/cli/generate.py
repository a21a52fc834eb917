"""`synthmed generate` and `synthmed export`: options -> config -> one pipeline call -> one summary line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from synthmed.cli.app import app, command, given, read_card


@app.command(short_help="Synthetic image-mask pairs from a trained model")
@command
def generate(
    data: Path = typer.Option(..., "--data", help="prepared data set whose train split (never validation/test) gives the layouts"),
    model: Path = typer.Option(..., "--model", help="output folder of `synthmed train controlnet`"),
    out: Path = typer.Option(..., "--out", help="output folder (prepared layout + provenance); OUT.partial while running"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of generation settings (the `generate:` section of a run config)"),
    n: Optional[int] = typer.Option(None, "--n", help="replay plan: number of samples"),
    plan: Optional[str] = typer.Option(None, help="replay | balance | multiply | counts (see --set plan.classes=[dead] plan.factor=3 plan.counts={dead:200})"),
    steps: Optional[int] = typer.Option(None),
    guidance_scale: Optional[float] = typer.Option(None),
    conditioning_scale: Optional[float] = typer.Option(None),
    scheduler: Optional[str] = typer.Option(None, help="ddim, unipc, dpm (DPM-Solver++ 2M) or euler"),
    batch_size: Optional[int] = typer.Option(None),
    filter_by: Optional[str] = typer.Option(None, "--filter", help="none | dice | confidence | both"),
    export: list[str] = typer.Option([], "--export", metavar="FORMAT", help="also write OUT/export/FORMAT: folder, medmnist, pannuke (repeatable)"),
    seed: Optional[int] = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="any setting KEY=VALUE (dotted for nested ones), e.g. -s layouts.copy_paste=6 -s guess_mode=true"),
    backbone: Optional[str] = typer.Option(None, help="override the backbone recorded in the model's training.json"),
):
    """Plan by class, make layouts from training masks, sample (resumable; `accelerate launch` shards it), filter, export."""
    from synthmed.config import GenerateConfig, load_yaml_config, overrides
    from synthmed.pipelines import generate as run_generate

    base = load_yaml_config(config, GenerateConfig).model_dump() if config else {}
    base |= given(n_samples=n, steps=steps, guidance_scale=guidance_scale, conditioning_scale=conditioning_scale, scheduler=scheduler,
                  batch_size=batch_size, seed=seed)
    if plan is not None:
        base.setdefault("plan", {})["mode"] = plan
    if filter_by is not None:
        base.setdefault("filter", {})["by"] = filter_by
    if export:
        base["export"] = export
    cfg = overrides(GenerateConfig, base, set_)
    out = run_generate(data, model, cfg, out, backbone=backbone)
    card = read_card(out)
    if card is not None:
        plan_info, kept = card.get("plan", {}), card.get("filter_summary", {})
        typer.echo(f"wrote {out}: {card['splits']['train']['n']} samples (plan {plan_info.get('mode')}, {plan_info.get('unit')}: "
                   f"combined {plan_info.get('combined')}; dropped by the filter {kept.get('dropped', 0)})")


@app.command(short_help="A prepared set in a source format (folder, medmnist, pannuke)")
@command
def export(
    data: Path = typer.Argument(..., help="a prepared data set, e.g. the output of `synthmed generate`"),
    fmt: str = typer.Option(..., "--format", help="folder | medmnist | pannuke"),
    out: Path = typer.Option(..., "--out", help="output folder (medmnist: a folder or a .npz file name)"),
    split: str = typer.Option("train", help="which split to export"),
    real: Optional[Path] = typer.Option(None, help="the real prepared set a synthetic one came from (default: its card's real_data)"),
):
    """Write a prepared (synthetic) data set in a source format its users' own loaders read."""
    from synthmed.generation.export import check_exportable, export_dataset

    check_exportable([fmt])  # the label check needs the real set's card too (--real): export_dataset makes it
    typer.echo(f"wrote {export_dataset(data, fmt, out, split=split, real=real)}")

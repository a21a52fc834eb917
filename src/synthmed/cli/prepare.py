"""`synthmed prepare FORMAT`: options -> PrepareConfig -> pipelines.prepare -> one summary line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from synthmed.cli.app import app, command, given, key_values


@app.command(short_help="A source data set, in its own layout, to the prepared layout")
@command
def prepare(
    source: str = typer.Argument(..., help="FORMAT: medmnist, pannuke, bci, pcam, camelyon, acdc, brats, busi, cbis-ddsm, folder, manifest, diffusers, or phantom-histology / phantom-breast (embedded)"),
    out: Path = typer.Option(..., "--out", help="output folder; re-running the same command resumes or does nothing"),
    root: Optional[Path] = typer.Option(None, "--root", help="the official download's root folder, unchanged"),
    flag: Optional[str] = typer.Option(None, "--flag", help="medmnist: the data set flag, e.g. pathmnist"),
    size: Optional[int] = typer.Option(None, "--size", help="output SIZE x SIZE (default: the format's; phantoms: 64, rendered at SIZE)"),
    resize: Optional[str] = typer.Option(None, "--resize", help="resize | crop | pad (stated in dataset.json)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="at most N samples per split"),
    workers: Optional[int] = typer.Option(None, "--workers", help="worker processes (default 0: one per core, up to 4)"),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad", help="skip invalid items, listing them in skipped.jsonl"),
    official_splits: Optional[bool] = typer.Option(None, "--official-splits/--own-splits", help="keep the source's splits where it has them (default)"),
    seed: Optional[int] = typer.Option(None, help="seed for patient-level splits (and the phantoms); default 0"),
    conditioning: Optional[str] = typer.Option(None, "--conditioning", help="builders to stack, comma-separated: colour,binary,onehot,boundary,canny,soft,tissue,source,given"),
    canny_low: Optional[float] = typer.Option(None, help="Canny low threshold (gradient of the [0, 1] image); default: the format's (0.05)"),
    canny_high: Optional[float] = typer.Option(None, help="Canny high threshold; default: the format's (0.15)"),
    canny_sigma: Optional[float] = typer.Option(None, help="Canny Gaussian sigma; default: the format's (1.5)"),
    canny_region: Optional[str] = typer.Option(None, help="image (default) | lesion (edges inside the dilated mask only)"),
    tissue_sigma: Optional[float] = typer.Option(None, help="tissue: Gaussian sigma in pixels of the prepared size (default 2.0)"),
    prompt_template: Optional[str] = typer.Option(None, "--prompt-template", help="e.g. '{modality}, {label}'"),
    option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE", help="format option KEY=VALUE (repeatable), e.g. -o level=2; phantom-breast: -o n_patients=200 -o images_per_patient=5 -o modality=both"),
    slides: Optional[int] = typer.Option(None, help="phantom: labelled slides (default 48)"),
    tiles_per_slide: Optional[int] = typer.Option(None, help="phantom: tiles per slide (default 12)"),
    unlabelled_slides: Optional[int] = typer.Option(None, help="phantom: unlabelled slides (default 150)"),
):
    """Turn a source data set, in its own layout, into the prepared layout (image folder + metadata.jsonl + dataset.json)."""
    from synthmed.config import PrepareConfig, overrides
    from synthmed.pipelines import PHANTOM
    from synthmed.pipelines import prepare as run_prepare

    options = key_values(option, "--option") | given(flag=flag)
    is_phantom = source == PHANTOM
    cfg = overrides(PrepareConfig, given(
        source=source, root=str(root) if root else None, options=options, size=None if is_phantom else size, resize=resize, limit=limit,
        workers=workers, skip_bad=skip_bad, official_splits=official_splits, seed=seed, prompt_template=prompt_template,
        phantom=given(seed=seed, size=size, n_slides=slides, tiles_per_slide=tiles_per_slide, n_unlabelled_slides=unlabelled_slides),
        conditioning=given(builders=conditioning.split(",") if conditioning else None, canny_low=canny_low, canny_high=canny_high,
                           canny_sigma=canny_sigma, canny_region=canny_region, tissue_sigma=tissue_sigma),
    ), [])
    card = run_prepare(cfg, out)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v['n']}" for k, v in card["splits"].items())
               + (f" ({card['skipped']} skipped: see {out / 'skipped.jsonl'})" if card.get("skipped") else ""))

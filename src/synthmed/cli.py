"""The `synthmed` command line: a thin edge over synthmed.flow."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from synthmed.io import SynthmedError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ControlNet-based synthetic medical images: prepare, train, generate, evaluate, report.")
train_app = typer.Typer(no_args_is_help=True, help="Train a backbone (tiny preset) or a ControlNet.")
app.add_typer(train_app, name="train")
evaluate_app = typer.Typer(help="Evaluate a synthetic set (plausibility, fidelity, memorisation); `evaluate downstream`: real vs real+synthetic training.")
app.add_typer(evaluate_app, name="evaluate", invoke_without_command=True)


def _quiet_libraries() -> None:
    """Keep library chatter (torchvision fallbacks, hub notices) out of the user's terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def command(fn):
    """Run a command body; a SynthmedError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except SynthmedError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished stages and checkpoints are kept; run the same command again "
                       "(`train backbone --resume` / `train controlnet --resume latest`) to continue", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@command
def prepare(
    source: str = typer.Argument(..., help="FORMAT: medmnist, pannuke, bci, pcam, camelyon, acdc, brats, busi, cbis-ddsm, folder, manifest, diffusers, or phantom-histology / phantom-breast (embedded)"),
    out: Path = typer.Option(..., "--out", help="output folder; re-running the same command resumes or does nothing"),
    root: Optional[Path] = typer.Option(None, "--root", help="the official download's root folder, unchanged"),
    flag: Optional[str] = typer.Option(None, "--flag", help="medmnist: the data set flag, e.g. pathmnist"),
    size: Optional[int] = typer.Option(None, "--size", help="output SIZE x SIZE (default: the format's; phantoms: 64, rendered at SIZE)"),
    resize: Optional[str] = typer.Option(None, "--resize", help="resize | crop | pad (stated in dataset.json)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="at most N samples per split"),
    workers: int = typer.Option(0, "--workers", help="worker processes (0: one per core, up to 4)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip invalid items, listing them in skipped.jsonl"),
    official_splits: bool = typer.Option(True, "--official-splits/--own-splits", help="keep the source's splits where it has them"),
    seed: int = typer.Option(0, help="seed for patient-level splits (and the phantoms)"),
    conditioning: Optional[str] = typer.Option(None, "--conditioning", help="builders to stack, comma-separated: colour,binary,onehot,boundary,canny,source,given"),
    canny_low: float = typer.Option(0.05, help="Canny low threshold (gradient of the [0, 1] image)"),
    canny_high: float = typer.Option(0.15, help="Canny high threshold"),
    canny_sigma: float = typer.Option(1.5, help="Canny Gaussian sigma"),
    canny_region: str = typer.Option("image", help="image | lesion (edges inside the dilated mask only)"),
    prompt_template: Optional[str] = typer.Option(None, "--prompt-template", help="e.g. '{modality}, {label}'"),
    option: list[str] = typer.Option([], "--option", "-o", help="format option KEY=VALUE (repeatable), e.g. -o level=2; phantom-breast: -o n_patients=200 -o images_per_patient=5 -o modality=both"),
    slides: int = typer.Option(48, help="phantom: labelled slides"),
    tiles_per_slide: int = typer.Option(12, help="phantom: tiles per slide"),
    unlabelled_slides: int = typer.Option(150, help="phantom: unlabelled slides"),
):
    """Turn a source data set, in its own layout, into the prepared layout (image folder + metadata.jsonl + dataset.json)."""
    import yaml

    from synthmed import flow
    from synthmed.config import ConditioningConfig, PhantomConfig, PrepareConfig

    options = {}
    for kv in option:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SynthmedError(f"--option expects KEY=VALUE, but got {kv!r}")
        options[key.strip()] = yaml.safe_load(value)
    if flag:
        options["flag"] = flag
    phantom = PhantomConfig(seed=seed, size=size or 64, n_slides=slides, tiles_per_slide=tiles_per_slide, n_unlabelled_slides=unlabelled_slides)
    is_phantom = source == flow.PHANTOM
    cfg = PrepareConfig(
        source=source, root=str(root) if root else None, options=options, phantom=phantom,
        size=None if is_phantom else size, resize=resize, limit=limit, workers=workers, skip_bad=skip_bad,
        official_splits=official_splits, seed=seed, prompt_template=prompt_template,
        conditioning=ConditioningConfig(builders=conditioning.split(",") if conditioning else None, canny_low=canny_low,
                                        canny_high=canny_high, canny_sigma=canny_sigma, canny_region=canny_region),
    )
    card = flow.prepare(cfg, out)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v['n']}" for k, v in card["splits"].items())
               + (f" ({card['skipped']} skipped: see {out / 'skipped.jsonl'})" if card.get("skipped") else ""))


@train_app.command("backbone")
@command
def train_backbone(
    data: Path = typer.Option(..., "--data", help="prepared data set with an 'unlabelled' split"),
    out: Path = typer.Option(..., "--out", help="output diffusers pipeline folder"),
    preset: str = typer.Option("tiny", help="architecture preset"),
    vae_steps: int = typer.Option(1500),
    unet_steps: int = typer.Option(3000),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoints in OUT.partial"),
):
    """Pretrain a backbone preset on unlabelled images (how the shipped tiny backbone was made)."""
    from synthmed import flow
    from synthmed.config import BackboneConfig
    from synthmed.models.registry import PRESETS

    if preset not in PRESETS:
        raise SynthmedError(f"unknown preset {preset!r} (known: {', '.join(sorted(PRESETS))})")
    folder = flow.train_backbone(data, BackboneConfig(preset=preset, vae_steps=vae_steps, unet_steps=unet_steps, seed=seed), out, resume=resume)
    typer.echo(f"wrote {folder}")


@train_app.command("controlnet")
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
    set_: list[str] = typer.Option([], "--set", "-s", help="any setting KEY=VALUE, dotted for nested ones (repeatable), e.g. -s lora.stage=before -s augment.crop=[48,48]"),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' (the newest checkpoint in --out) or a checkpoint folder"),
):
    """Train a ControlNet (or, --conditioning-mode text, the UNet) against the frozen backbone."""
    from synthmed import flow
    from synthmed.config import ControlNetConfig, load_yaml_config, overrides

    base = load_yaml_config(config, ControlNetConfig).model_dump() if config else {}
    flags = dict(backbone=backbone, steps=steps, batch_size=batch_size, lr=lr, seed=seed, conditioning_mode=conditioning_mode,
                 depth=depth, mixed_precision=mixed_precision)
    base |= {k: v for k, v in flags.items() if v is not None}
    if lora_rank is not None:
        base.setdefault("lora", {})["rank"] = lora_rank
    cfg = overrides(ControlNetConfig, base, set_)
    typer.echo(f"wrote {flow.train_controlnet(data, cfg, out, resume=resume or False)}")


@app.command()
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
    export: list[str] = typer.Option([], "--export", help="also write OUT/export/FORMAT: folder, medmnist, pannuke (repeatable)"),
    seed: Optional[int] = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", "-s", help="any setting KEY=VALUE (dotted for nested ones), e.g. -s layouts.copy_paste=6 -s guess_mode=true"),
    backbone: Optional[str] = typer.Option(None, help="override the backbone recorded in the model's training.json"),
):
    """Plan by class, make layouts from training masks, sample (resumable; `accelerate launch` shards it), filter, export."""
    from synthmed import flow
    from synthmed.config import GenerateConfig, load_yaml_config, overrides

    base = load_yaml_config(config, GenerateConfig).model_dump() if config else {}
    flags = dict(n_samples=n, steps=steps, guidance_scale=guidance_scale, conditioning_scale=conditioning_scale, scheduler=scheduler,
                 batch_size=batch_size, seed=seed)
    base |= {k: v for k, v in flags.items() if v is not None}
    if plan is not None:
        base.setdefault("plan", {})["mode"] = plan
    if filter_by is not None:
        base.setdefault("filter", {})["by"] = filter_by
    if export:
        base["export"] = export
    cfg = overrides(GenerateConfig, base, set_)
    out = flow.generate(data, model, cfg, out, backbone=backbone)
    card = _read_card(out)
    if card is not None:
        plan_info, kept = card.get("plan", {}), card.get("filter_summary", {})
        typer.echo(f"wrote {out}: {card['splits']['train']['n']} samples (plan {plan_info.get('mode')}, {plan_info.get('unit')}: "
                   f"combined {plan_info.get('combined')}; dropped by the filter {kept.get('dropped', 0)})")


def _num(x) -> str:
    """A figure for a one-line summary; n/a where a metric does not apply."""
    return "n/a" if x is None else f"{x:.3f}"


def _read_card(out: Path):
    """The card of a finished output (None on the other processes of a multi-process run: one report is enough)."""
    import os

    from synthmed.io import read_json

    return read_json(out / "dataset.json") if os.environ.get("RANK", "0") == "0" and (out / "dataset.json").is_file() else None


@app.command()
@command
def export(
    data: Path = typer.Argument(..., help="a prepared data set, e.g. the output of `synthmed generate`"),
    fmt: str = typer.Option(..., "--format", help="folder | medmnist | pannuke"),
    out: Path = typer.Option(..., "--out", help="output folder (medmnist: a folder or a .npz file name)"),
    split: str = typer.Option("train", help="which split to export"),
    real: Optional[Path] = typer.Option(None, help="the real prepared set a synthetic one came from (default: its card's real_data)"),
):
    """Write a prepared (synthetic) data set in a source format its users' own loaders read."""
    from synthmed.generation.export import FORMATS, export_dataset

    if fmt not in FORMATS:
        raise SynthmedError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    typer.echo(f"wrote {export_dataset(data, fmt, out, split=split, real=real)}")


@evaluate_app.callback()
@command
def evaluate(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", help="the real prepared data set"),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", help="output folder of `synthmed generate`"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder for results.json"),
    model: Optional[Path] = typer.Option(None, "--model", help="the trained model (`synthmed train controlnet`): enables same-mask regeneration of validation masks for paired SSIM/PSNR"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of evaluation settings (the `evaluate:` section of a run config)"),
    extractor: list[str] = typer.Option([], "--extractor", help="feature space for FID/KID: domain, inception or module:function (repeatable)"),
    inception_weights: Optional[Path] = typer.Option(None, help="pt_inception-2015-12-05-6726825d.pth for --extractor inception"),
    segmenter_steps: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", "-s", help="any setting KEY=VALUE, e.g. -s n_boot=1000 -s paired_regeneration=0"),
):
    """Plausibility, FID/KID/precision-recall per feature space, paired SSIM/PSNR/MS-SSIM, memorisation; 95% CIs."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, v in (("--data", data), ("--synthetic", synthetic), ("--out", out)) if v is None]
    if missing:
        raise SynthmedError(f"evaluate needs {', '.join(missing)} (or: synthmed evaluate downstream --help)")
    from synthmed import flow
    from synthmed.config import EvaluateConfig, load_yaml_config, overrides

    base = load_yaml_config(config, EvaluateConfig).model_dump() if config else {}
    flags = dict(segmenter_steps=segmenter_steps, seed=seed, inception_weights=str(inception_weights) if inception_weights else None, extractors=extractor or None)
    base |= {k: v for k, v in flags.items() if v is not None}
    res = flow.evaluate(data, synthetic, overrides(EvaluateConfig, base, set_), out, model=model)
    p = res["plausibility"]
    spaces = ", ".join(f"FID({k}) {v['fid']['value']:.2f}, KID({k}) {v['kid']['value']:.4f}" for k, v in res["fidelity"]["feature_spaces"].items())
    typer.echo(f"dice generated {p['dice_generated']:.3f}, shuffled {p['dice_shuffled']:.3f}, real test {p['dice_real_test']:.3f}; "
               f"ssim {_num(res['fidelity']['ssim'])}; {spaces}; near-copies {res['memorisation']['n_flagged']}; wrote {out}")


@evaluate_app.command("downstream")
@command
def evaluate_downstream(
    data: Path = typer.Option(..., "--data", help="the real prepared data set (its train split is subset; validation stops early; test scores)"),
    out: Path = typer.Option(..., "--out", help="study folder; re-running it skips finished cells"),
    synthetic: list[str] = typer.Option([], "--synthetic", help="PATH (every fraction) or FRACTION=PATH, a `generate` output whose model and masks come from that fraction only (repeatable)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of study settings (the `downstream:` section of a run config)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="any setting KEY=VALUE, e.g. -s fractions=[0.1,1.0] -s seeds=[0,1,2] -s arms=[real,real+classic]"),
):
    """Train MONAI models on real / real+synthetic / synthetic-only / real+classic arms per real fraction and seed; CIs and paired tests."""
    from synthmed import flow_study
    from synthmed.config import DownstreamConfig, load_yaml_config, overrides

    cfg = overrides(DownstreamConfig, load_yaml_config(config, DownstreamConfig).model_dump() if config else {}, set_)
    sets = {}
    for item in synthetic:
        frac, sep, path = item.rpartition("=")
        try:
            sets[float(frac) if sep else None] = Path(path)
        except ValueError:
            raise SynthmedError(f"--synthetic expects PATH or FRACTION=PATH, but got {item!r}") from None
    res = flow_study.downstream(data, cfg, out, sets)
    typer.echo(f"{res['n_finished']}/{res['n_cells']} cells finished ({len(res['errors'])} failed); wrote {Path(out) / 'results.json'}")
    flow_study.report(out / "results.json", out / "report.html")
    typer.echo(f"report: {Path(out) / 'report.html'}")


@app.command()
@command
def report(
    results: Path = typer.Argument(..., help="results.json from `synthmed evaluate`"),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write"),
):
    """Write a self-contained HTML report (numbers, per-class chart, sample grid)."""
    from synthmed import flow

    typer.echo(f"wrote {flow.report(results, out)}")


@app.command()
@command
def run(
    config: Path = typer.Argument(..., help="experiment YAML (configs/, experiments/)"),
    out: Path = typer.Option(..., "--out", help="run folder; re-running on it resumes (finished stages and study cells are kept)"),
    quick: bool = typer.Option(False, "--quick", help="lay the config's `quick:` settings over it (a test-sized run)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="any setting KEY=VALUE (dotted), e.g. -s data=/path/to/prepared -s downstream.seeds=[0,1,2,3,4]"),
):
    """Run one experiment from a YAML config: the generation flow, or a study (experiment: data_augmentation, ...)."""
    from synthmed import flow
    from synthmed.config import RunConfig, load_yaml_config, overrides, quick_version

    cfg = load_yaml_config(config, RunConfig)
    if quick:  # first: --set wins over the quick section too
        cfg = quick_version(cfg, str(config))
    if set_:
        cfg = overrides(RunConfig, cfg.model_dump(), set_)
    _summary(flow.run(cfg, out), out)


@app.command()
@command
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="run folder; re-running on it resumes"),
    quick: bool = typer.Option(False, "--quick", help="a small version (about a minute) for tests"),
):
    """The whole flow on the embedded default: phantom-histology + the shipped tiny backbone."""
    from synthmed import flow

    _summary(flow.demo(out, quick=quick), out)


def _summary(results: dict, out: Path) -> None:
    if "cells" in results and "n_cells" in results:  # an ablation study
        typer.echo(f"{len(results['cells'])}/{results['n_cells']} cells finished ({len(results['errors'])} failed)\nreport: {Path(out) / 'report.html'}")
        return
    if "summary" in results:  # a downstream study
        typer.echo(f"{results['n_finished']}/{results['n_cells']} cells finished ({len(results['errors'])} failed)\nreport: {Path(out) / 'report.html'}")
        return
    p = results["plausibility"]
    typer.echo(
        f"dice generated {p['dice_generated']:.3f} | shuffled {p['dice_shuffled']:.3f} | real test {p['dice_real_test']:.3f} | "
        f"ssim {_num(results['fidelity']['ssim'])}\nreport: {Path(out) / 'report.html'}"
    )


def main() -> None:
    """Console-script entry point."""
    app(prog_name="synthmed")


if __name__ == "__main__":
    sys.exit(main())

"""`synthmed evaluate` and `synthmed evaluate downstream`: options -> config -> one pipeline call -> one summary line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from synthmed.cli.app import command, evaluate_app, given, num
from synthmed.core.io import SynthmedError


@evaluate_app.callback()
@command
def evaluate(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", help="the real prepared data set"),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", help="output folder of `synthmed generate`"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder for results.json"),
    model: Optional[Path] = typer.Option(None, "--model", help="the trained model (`synthmed train controlnet`): enables same-mask regeneration of validation masks for paired SSIM/PSNR"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of evaluation settings (the `evaluate:` section of a run config)"),
    extractor: list[str] = typer.Option([], "--extractor", metavar="NAME", help="feature space for FID/KID: domain, inception or module:function (repeatable)"),
    inception_weights: Optional[Path] = typer.Option(None, help="pt_inception-2015-12-05-6726825d.pth for --extractor inception"),
    segmenter_steps: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="any setting KEY=VALUE, e.g. -s n_boot=1000 -s paired_regeneration=0"),
):
    """Plausibility, FID/KID/precision-recall per feature space, paired SSIM/PSNR/MS-SSIM, memorisation; 95% CIs."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, v in (("--data", data), ("--synthetic", synthetic), ("--out", out)) if v is None]
    if missing:
        raise SynthmedError(f"evaluate needs {', '.join(missing)} (or: synthmed evaluate downstream --help)")
    from synthmed.config import EvaluateConfig, load_yaml_config, overrides
    from synthmed.pipelines import evaluate as run_evaluate

    base = load_yaml_config(config, EvaluateConfig).model_dump() if config else {}
    if segmenter_steps is not None:
        base.setdefault("segmenter", {})["steps"] = segmenter_steps
    base |= given(seed=seed, inception_weights=str(inception_weights) if inception_weights else None, extractors=extractor or None)
    res = run_evaluate(data, synthetic, overrides(EvaluateConfig, base, set_), out, model=model)
    p = res["plausibility"]
    spaces = ", ".join(f"FID({k}) {v['fid']['value']:.2f}, KID({k}) {v['kid']['value']:.4f}" for k, v in res["fidelity"]["feature_spaces"].items())
    typer.echo(f"dice generated {p['dice_generated']:.3f}, shuffled {p['dice_shuffled']:.3f}, real test {p['dice_real_test']:.3f}; "
               f"ssim {num(res['fidelity']['ssim'])}; {spaces}; near-copies {res['memorisation']['n_flagged']}; wrote {out}")


@evaluate_app.command("roundtrip", short_help="Can the backbone's autoencoder carry your classes?")
@command
def evaluate_roundtrip(
    data: Path = typer.Option(..., "--data", help="the real prepared data set"),
    backbone: str = typer.Option("tiny", "--backbone", help="preset with shipped weights, diffusers folder, single-file .safetensors or hub id (local cache)"),
    out: Path = typer.Option(..., "--out", help="output folder for results.json and round_trip.png"),
    split: str = typer.Option("validation", "--split", help="the real split to round-trip"),
    model: Optional[Path] = typer.Option(None, "--model", help="a `train controlnet` folder: its backbone with the VAE decoder it fine-tuned (controlnet.decoder)"),
    judge: bool = typer.Option(True, "--judge/--no-judge", help="train a segmenter on the real train split and compare its Dice on originals and round trips"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of evaluation settings (segmenter recipe, model_cache)"),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="any evaluation setting KEY=VALUE, e.g. -s segmenter.steps=600"),
):
    """Before training: can the backbone's autoencoder carry your classes? Per-class reconstruction error and a judge's Dice on round trips."""
    from synthmed.config import EvaluateConfig, load_yaml_config, overrides
    from synthmed.pipelines import roundtrip

    cfg = overrides(EvaluateConfig, load_yaml_config(config, EvaluateConfig).model_dump() if config else {}, set_)
    res = roundtrip(data, backbone, cfg, out, split=split, judge=judge, model=model)
    rare = res["rare_class"]
    errs = ", ".join(f"{c} {num(v['mae'])}" for c, v in res["mae"].items())
    line = f"round trip of {res['n_images']} {split} images: error (grey levels) {errs}; {rare} vs other classes x{num(res['rare_vs_other_classes'])}"
    if res.get("judge"):
        j = res["judge"][rare]
        line += f"; judge Dice on {rare}: originals {num(j['dice_original'])}, round trips {num(j['dice_round_trip'])}"
        if (res.get("refined") or {}).get("judge"):
            line += f", refined round trips {num(res['refined']['judge'][rare]['dice_round_trip'])}"
    typer.echo(line + f"; wrote {out}")


@evaluate_app.command("downstream", short_help="Real vs real+synthetic training of task models, per arm")
@command
def evaluate_downstream(
    data: Path = typer.Option(..., "--data", help="the real prepared data set (its train split is subset; validation stops early; test scores)"),
    out: Path = typer.Option(..., "--out", help="study folder; re-running it skips finished cells"),
    synthetic: list[str] = typer.Option([], "--synthetic", metavar="[FRACTION=]PATH", help="PATH (every fraction) or FRACTION=PATH, a `generate` output whose model and masks come from that fraction only (repeatable)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of study settings (the `downstream:` section of a run config)"),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="any setting KEY=VALUE, e.g. -s fractions=[0.1,1.0] -s seeds=[0,1,2] -s arms=[real,real+classic]"),
):
    """Train MONAI models per arm (real, real+classic, +synthetic, synthetic-pretrain, the held-out/oracle ceilings) per real fraction and seed; CIs, paired tests, synthetic utility."""
    from synthmed.config import DownstreamConfig, load_yaml_config, overrides

    cfg = overrides(DownstreamConfig, load_yaml_config(config, DownstreamConfig).model_dump() if config else {}, set_)
    sets = {}
    for item in synthetic:
        frac, sep, path = item.rpartition("=")
        try:
            sets[float(frac) if sep else None] = Path(path)
        except ValueError:
            raise SynthmedError(f"--synthetic expects PATH or FRACTION=PATH, but got {item!r}") from None
    from synthmed.pipelines import downstream, study_report

    res = downstream(data, cfg, out, sets)
    typer.echo(f"{res['n_finished']}/{res['n_cells']} cells finished ({len(res['errors'])} failed); wrote {Path(out) / 'results.json'}")
    study_report(out / "results.json", out / "report.html")
    typer.echo(f"report: {Path(out) / 'report.html'}")

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
                       "(`train backbone` / `train controlnet` with --resume) to continue", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@command
def prepare(
    source: str = typer.Argument(..., help="source format; the embedded one is 'phantom-histology'"),
    out: Path = typer.Option(..., "--out", help="output folder (must not exist or be empty)"),
    seed: int = typer.Option(0, help="phantom seed"),
    size: int = typer.Option(64, help="phantom tile size: 64, 128 or 256"),
    slides: int = typer.Option(48, help="labelled phantom slides"),
    tiles_per_slide: int = typer.Option(12, help="tiles per slide"),
    unlabelled_slides: int = typer.Option(150, help="unlabelled phantom slides"),
):
    """Write a data set in the prepared layout (image folder + metadata.jsonl + dataset.json)."""
    from synthmed import flow
    from synthmed.config import PhantomConfig, PrepareConfig

    phantom = PhantomConfig(seed=seed, size=size, n_slides=slides, tiles_per_slide=tiles_per_slide, n_unlabelled_slides=unlabelled_slides)
    card = flow.prepare(PrepareConfig(source=source, phantom=phantom), out)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v['n']}" for k, v in card["splits"].items()))


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
    out: Path = typer.Option(..., "--out", help="output folder: controlnet/, checkpoints/, training.json"),
    backbone: str = typer.Option("tiny", help="preset with shipped weights, diffusers folder, or hub id (local cache)"),
    steps: int = typer.Option(1500),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(5e-4),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --out"),
):
    """Train a ControlNet on colour-coded class masks against the frozen backbone."""
    from synthmed import flow
    from synthmed.config import ControlNetConfig

    cfg = ControlNetConfig(backbone=backbone, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    typer.echo(f"wrote {flow.train_controlnet(data, cfg, out, resume=resume)}")


@app.command()
@command
def generate(
    data: Path = typer.Option(..., "--data", help="prepared data set whose train-split masks condition generation"),
    model: Path = typer.Option(..., "--model", help="output folder of `synthmed train controlnet`"),
    out: Path = typer.Option(..., "--out", help="output folder (prepared layout + provenance)"),
    n: int = typer.Option(96, "--n", help="number of samples"),
    steps: int = typer.Option(25),
    guidance_scale: float = typer.Option(3.0),
    conditioning_scale: float = typer.Option(1.5),
    scheduler: str = typer.Option("unipc", help="ddim, unipc, dpm or euler"),
    seed: int = typer.Option(0),
    backbone: Optional[str] = typer.Option(None, help="override the backbone recorded in the model's training.json"),
):
    """Generate synthetic images from training-split masks, with per-sample provenance."""
    from synthmed import flow
    from synthmed.config import GenerateConfig

    cfg = GenerateConfig(n_samples=n, steps=steps, guidance_scale=guidance_scale, conditioning_scale=conditioning_scale, scheduler=scheduler, seed=seed)
    typer.echo(f"wrote {flow.generate(data, model, cfg, out, backbone=backbone)}")


@app.command()
@command
def evaluate(
    data: Path = typer.Option(..., "--data", help="the real prepared data set"),
    synthetic: Path = typer.Option(..., "--synthetic", help="output folder of `synthmed generate`"),
    out: Path = typer.Option(..., "--out", help="output folder for results.json"),
    segmenter_steps: int = typer.Option(1200),
    seed: int = typer.Option(0),
):
    """Plausibility (Dice/IoU vs own and shuffled masks, real-test reference) and SSIM."""
    from synthmed import flow
    from synthmed.config import EvaluateConfig

    res = flow.evaluate(data, synthetic, EvaluateConfig(segmenter_steps=segmenter_steps, seed=seed), out)
    p = res["plausibility"]
    typer.echo(f"dice generated {p['dice_generated']:.3f}, shuffled {p['dice_shuffled']:.3f}, real test {p['dice_real_test']:.3f}; ssim {res['fidelity']['ssim']:.3f}")


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
    config: Path = typer.Argument(..., help="experiment YAML (see configs/)"),
    out: Path = typer.Option(..., "--out", help="run folder; re-running on it resumes"),
):
    """Run prepare -> train -> generate -> evaluate -> report from one YAML config."""
    from synthmed import flow
    from synthmed.config import RunConfig, load_yaml_config

    _summary(flow.run(load_yaml_config(config, RunConfig), out), out)


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
    p = results["plausibility"]
    typer.echo(
        f"dice generated {p['dice_generated']:.3f} | shuffled {p['dice_shuffled']:.3f} | real test {p['dice_real_test']:.3f} | "
        f"ssim {results['fidelity']['ssim']:.3f}\nreport: {Path(out) / 'report.html'}"
    )


def main() -> None:
    """Console-script entry point."""
    app(prog_name="synthmed")


if __name__ == "__main__":
    sys.exit(main())

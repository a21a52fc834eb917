"""`synthmed run`, `synthmed demo` and `synthmed report`: one pipeline call and one summary line each."""

from __future__ import annotations

from pathlib import Path

import typer

from synthmed.cli.app import app, command, num


@app.command(short_help="An HTML report from results.json")
@command
def report(
    results: Path = typer.Argument(..., help="results.json from `synthmed evaluate`"),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write"),
):
    """Write a self-contained HTML report (numbers, per-class chart, sample grid)."""
    from synthmed.pipelines import report as run_report

    typer.echo(f"wrote {run_report(results, out)}")


@app.command(short_help="One experiment from a YAML config (the flow or a study)")
@command
def run(
    config: Path = typer.Argument(..., help="experiment YAML (configs/, experiments/)"),
    out: Path = typer.Option(..., "--out", help="run folder; re-running on it resumes (finished stages and study cells are kept)"),
    quick: bool = typer.Option(False, "--quick", help="lay the config's `quick:` settings over it (a test-sized run)"),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="any setting KEY=VALUE (dotted), e.g. -s data=/path/to/prepared -s downstream.seeds=[0,1,2,3,4]"),
):
    """Run one experiment from a YAML config: the generation flow, or a study (experiment: data_augmentation, ...)."""
    from synthmed.config import RunConfig, load_yaml_config, overrides, quick_version

    cfg = load_yaml_config(config, RunConfig)
    if quick:  # first: --set wins over the quick section too
        cfg = quick_version(cfg, str(config))
    if set_:
        cfg = overrides(RunConfig, cfg.model_dump(), set_)
    from synthmed.pipelines import run as run_experiment

    _summary(run_experiment(cfg, out), out)


@app.command(short_help="The whole flow on the embedded default")
@command
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="run folder; re-running on it resumes"),
    quick: bool = typer.Option(False, "--quick", help="a small version (about a minute) for tests"),
):
    """The whole flow on the embedded default: phantom-histology + the shipped tiny backbone."""
    from synthmed.pipelines import demo as run_demo

    _summary(run_demo(out, quick=quick), out)


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
        f"ssim {num(results['fidelity']['ssim'])}" + _rare_line(results) + f"\nreport: {Path(out) / 'report.html'}"
    )


def _rare_line(results: dict) -> str:
    """The rare class's plausibility (generated vs real test Dice) and what the backbone's round trip leaves of it."""
    rt = results.get("round_trip") or {}
    rare = rt.get("rare_class")
    per_class = results["plausibility"].get("per_class") or {}
    if not rare or rare not in per_class.get("generated", {}):
        return ""
    gen, real = per_class["generated"][rare]["dice"], per_class["real_test"][rare]["dice"]
    judge = (rt.get("judge") or {}).get(rare) or {}
    refined = ((rt.get("refined") or {}).get("judge") or {}).get(rare)
    return (f"\n{rare} (rare): dice generated {num(gen)} | real test {num(real)} | real test round-tripped through the VAE "
            f"{num(judge.get('dice_round_trip'))} (reconstruction error x{num(rt.get('rare_vs_other_classes'))} the other classes')"
            + (f" | refined round trip {num(refined['dice_round_trip'])}" if refined else ""))

"""`synthmed run CONFIG.yaml` and `synthmed demo`: an experiment from a YAML config, in one folder.

An experiment is a name in EXPERIMENTS: the generation flow (prepare -> train controlnet -> generate ->
evaluate -> report) or a study. Each stage writes its own subfolder atomically and is skipped once complete,
so re-running on the same folder resumes where the last run stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from synthmed.config import ControlNetConfig, EvaluateConfig, GenerateConfig, PrepareConfig, RunConfig, save_config
from synthmed.core.io import read_json, write_json
from synthmed.core.outputs import check_output, open_output

RUN_KIND = "run"


def generation(cfg: RunConfig, out: Path, data: Path) -> tuple[dict, str]:
    """train controlnet -> generate -> evaluate -> report; each stage skipped once its output is complete."""
    from synthmed.models.trained import is_complete
    from synthmed.pipelines.evaluate import evaluate
    from synthmed.pipelines.generate import generate
    from synthmed.pipelines.report import report
    from synthmed.pipelines.train import train_controlnet

    model, synthetic, evaluation = out / "controlnet", out / "synthetic", out / "evaluation"
    if not is_complete(model):  # any trained model folder: controlnet/, or backbone/ in text mode
        train_controlnet(data, cfg.controlnet, model, resume=True)
    if not (synthetic / "dataset.json").is_file():
        generate(data, model, cfg.generate, synthetic)
    if not (evaluation / "results.json").is_file():
        evaluate(data, synthetic, cfg.evaluate, evaluation, model=model)
    report(evaluation / "results.json", out / "report.html")
    return read_json(evaluation / "results.json"), "evaluation/results.json"


def data_augmentation(cfg: RunConfig, out: Path, data: Path) -> tuple[dict, str]:
    """The downstream study over real fractions (pipelines/studies/downstream.py) and its report."""
    from synthmed.pipelines.report import study_report
    from synthmed.pipelines.studies.downstream import data_augmentation as study

    results = study(cfg, out, data)
    study_report(out / "downstream" / "results.json", out / "report.html", title="synthmed study: data augmentation")
    return results, "downstream/results.json"


def ablations(cfg: RunConfig, out: Path, data: Path) -> tuple[dict, str]:
    """One generation run per ablation cell (pipelines/studies/ablations.py) and the comparison report."""
    from synthmed.pipelines.report import ablation_report
    from synthmed.pipelines.studies.ablations import ablations as study

    results = study(cfg, out, data, run)
    ablation_report(out / "results.json", out / "report.html")
    return results, "results.json"


# experiment name (RunConfig.experiment) -> (cfg, run folder, prepared data) -> (results, results file in the folder)
EXPERIMENTS = {"generation": generation, "baseline_generation": generation, "data_augmentation": data_augmentation, "ablations": ablations}


def run(cfg: RunConfig, out: Path, resume: bool = True) -> dict:
    """Run the experiment `cfg.experiment` in OUT, preparing the data first unless `cfg.data` names a prepared set."""
    from synthmed.pipelines.prepare import prepare

    from synthmed.data.prepared import read_card

    out = Path(out)
    check_output(out, RUN_KIND, resume)
    if cfg.data:
        read_card(cfg.data)  # before the run folder is made: a data set that is not there is a one-line error
    open_output(out, RUN_KIND, resume)
    save_config(cfg, out / "run_config.yaml")
    started = time.time()
    data = Path(cfg.data) if cfg.data else out / "data"
    if not cfg.data and not (data / "dataset.json").is_file():
        prepare(cfg.prepare, data)
    results, where = EXPERIMENTS[cfg.experiment](cfg, out, data)
    write_json(out / "run.json", {"seconds_this_invocation": round(time.time() - started, 1), "report": "report.html", "results": where})
    return results


def demo_config(quick: bool = False) -> RunConfig:
    """The embedded default: phantom-histology + the shipped tiny backbone. --quick is for tests.

    The full demo generates for the rare class: three times the real training split's dead nuclei
    (copy-paste into flipped/warped training layouts; the ControlNet's diffusion loss weighs dead-nucleus
    latents 5x). Before the ControlNet, the VAE decoder is fine-tuned on the train split with dead-nucleus
    pixels weighted 20x (the shipped one draws them back as ordinary nuclei: `synthmed evaluate roundtrip`).
    Each sample is filtered by a real-trained segmenter's Dice against its mask, and the dead nuclei it was
    made for must be found (focus Dice 0.3; redrawn up to 5 times). The judges (filter and evaluation)
    weigh their cross-entropy by median frequency, so that they see the rare class. The threshold is explicit (0.4): the tiny
    CPU model's samples score below the automatic one (the judge's 10% quantile on real validation
    images, 0.66 here), which would drop them all.
    """
    from synthmed.config import DecoderConfig, FilterConfig, PhantomConfig, PlanConfig, TaskTrainingConfig, quick_version

    judge = TaskTrainingConfig(steps=1200, class_weighting="median_frequency")  # a judge that sees the rare class
    decoder = DecoderConfig(steps=500, batch_size=16, class_weights={"dead": 20.0, **{c: 2.0 for c in ("neoplastic", "inflammatory", "connective", "epithelial")}})
    full = RunConfig(prepare=PrepareConfig(phantom=PhantomConfig(n_unlabelled_slides=0)),
                     controlnet=ControlNetConfig(steps=1200, validation_every=400, class_weights={"dead": 5.0}, decoder=decoder),
                     generate=GenerateConfig(plan=PlanConfig(mode="multiply", classes=["dead"], factor=3),
                                             filter=FilterConfig(by="dice", min_dice=0.4, min_focus_dice=0.3, attempts=5, segmenter=judge)),
                     evaluate=EvaluateConfig(segmenter=judge), quick=DEMO_QUICK)
    return quick_version(full, "demo") if quick else full


# What `synthmed demo --quick` (and `synthmed run configs/demo.yaml --quick`) lays over the demo: test-sized.
DEMO_QUICK = {
    "prepare": {"phantom": {"n_slides": 9, "tiles_per_slide": 6}},
    "controlnet": {"steps": 30, "batch_size": 8, "checkpoint_every": 20, "validation_every": 0, "class_weights": None,
                   "decoder": {"steps": 2, "batch_size": 4, "class_weights": None}},
    "generate": {"n_samples": 8, "steps": 8, "batch_size": 8, "plan": {"mode": "replay", "classes": None, "factor": 2.0},
                 "filter": {"min_dice": 0.0, "min_focus_dice": None, "attempts": 3, "segmenter": {"steps": 30, "batch_size": 8, "class_weighting": "none"}}},
    "evaluate": {"segmenter": {"steps": 60, "batch_size": 8, "class_weighting": "none"}, "domain": {"steps": 20}, "n_boot": 20},
}


def demo(out: Path, quick: bool = False) -> dict:
    """Run the whole flow on the embedded default."""
    return run(demo_config(quick), out)

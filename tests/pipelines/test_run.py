"""`synthmed run`: re-running on a finished folder skips every finished stage, whatever the model's kind."""

from __future__ import annotations

import importlib

from synthmed import pipelines
from synthmed.config import ControlNetConfig, EvaluateConfig, FilterConfig, GenerateConfig, RunConfig


def _boom(*args, **kwargs):
    raise AssertionError("a finished stage ran again")


def test_rerun_of_a_text_mode_run_keeps_its_trained_model(phantom_data, tmp_path, monkeypatch):
    """A text-mode model writes backbone/, not controlnet/: a re-run must still see it finished and not train again
    (it used to re-enter training and overwrite training.json with an empty loss history)."""
    cfg = RunConfig(experiment="baseline_generation", data=str(phantom_data),
                    controlnet=ControlNetConfig(conditioning_mode="text", steps=3, batch_size=4, checkpoint_every=2, log_with=None),
                    generate=GenerateConfig(n_samples=5, steps=2, batch_size=5, filter=FilterConfig(by="none")),
                    evaluate=EvaluateConfig(segmenter_steps=2, segmenter_batch_size=4, domain_steps=2, n_boot=10, paired_regeneration=0))
    out = tmp_path / "run"
    pipelines.run(cfg, out)
    model = out / "controlnet"
    assert (model / "backbone" / "model_index.json").is_file() and not (model / "controlnet").exists()
    record = (model / "training.json").read_bytes()
    results = (out / "evaluation" / "results.json").read_bytes()
    for stage in ("train.train_controlnet", "generate.generate", "evaluate.evaluate"):  # modules, not the package's functions
        module, name = stage.split(".")
        monkeypatch.setattr(importlib.import_module(f"synthmed.pipelines.{module}"), name, _boom)
    pipelines.run(cfg, out)
    assert (model / "training.json").read_bytes() == record  # the loss history of the first run, untouched
    assert (out / "evaluation" / "results.json").read_bytes() == results


def test_is_complete_needs_the_record_and_every_listed_part(tmp_path):
    from synthmed.core.io import write_json
    from synthmed.models.trained import is_complete

    model = tmp_path / "m"
    (model / "backbone" / "unet").mkdir(parents=True)
    assert not is_complete(model)  # no training.json yet: training has not finished
    write_json(model / "training.json", {"outputs": {"backbone": "backbone"}})
    assert not is_complete(model)  # listed part without weights
    (model / "backbone" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert is_complete(model)
    write_json(model / "training.json", {"outputs": {"backbone": "backbone", "unet_lora": "unet_lora"}})
    assert not is_complete(model)

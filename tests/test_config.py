from pathlib import Path

import pytest

from synthmed.config import RunConfig, load_yaml_config, overrides, save_config
from synthmed.flow import demo_config
from synthmed.io import SynthmedError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_demo_config_is_what_demo_runs():
    assert load_yaml_config(CONFIGS / "demo.yaml", RunConfig) == demo_config(quick=False)


def test_saved_config_round_trips(tmp_path):
    cfg = demo_config(quick=True)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_yaml_config(tmp_path / "c.yaml", RunConfig) == cfg


def test_config_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate: {scheduler: pndm}\n")
    with pytest.raises(SynthmedError, match=r"bad.yaml: generate.scheduler"):
        load_yaml_config(bad, RunConfig)
    bad.write_text("controlnet: {stepz: 3}\n")
    with pytest.raises(SynthmedError, match="stepz"):
        load_yaml_config(bad, RunConfig)
    bad.write_text("a: [\n")
    with pytest.raises(SynthmedError, match="not valid YAML"):
        load_yaml_config(bad, RunConfig)


def test_shipped_training_config_loads_and_set_overrides_nested_fields():
    from synthmed.config import ControlNetConfig, overrides

    cfg = load_yaml_config(CONFIGS / "train_sd15_gpu.yaml", ControlNetConfig)
    assert cfg.backbone == "sd15" and cfg.mixed_precision == "bf16" and cfg.lora.rank == 0
    changed = overrides(ControlNetConfig, cfg.model_dump(), ["lora.rank=16", "augment.crop=[256, 256]", "depth=shallow:2"])
    assert changed.lora.rank == 16 and changed.augment.crop == (256, 256) and changed.depth == "shallow:2" and changed.steps == cfg.steps
    with pytest.raises(SynthmedError, match="--set expects KEY=VALUE"):
        overrides(ControlNetConfig, {}, ["lora.rank"])
    with pytest.raises(SynthmedError, match="optimizer: String should match pattern"):
        overrides(ControlNetConfig, {}, ["optimizer=sgd"])


@pytest.mark.parametrize("name", ["data_augmentation", "mask_conditioned_generation", "baseline_generation", "ablations"])
def test_every_experiment_config_and_its_quick_version_validate(name):
    from synthmed.config import RunConfig, load_yaml_config, quick_version

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml"
    cfg = load_yaml_config(path, RunConfig)
    quick = quick_version(cfg, str(path))
    assert cfg.data is None and cfg.prepare.source == "phantom-histology"  # the embedded default as is ...
    assert quick.controlnet.steps < cfg.controlnet.steps and quick.prepare.phantom.n_slides < cfg.prepare.phantom.n_slides
    mine = overrides(RunConfig, cfg.model_dump(), ["data=/my/prepared"])  # ... or a prepared data set by changing one path
    assert mine.data == "/my/prepared" and mine.experiment == cfg.experiment


def test_breast_experiment_and_real_data_configs_validate_with_their_quick_versions():
    from synthmed.config import RunConfig, load_yaml_config, quick_version

    root = Path(__file__).resolve().parents[1]
    cfg = load_yaml_config(root / "experiments" / "breast_classification.yaml", RunConfig)
    assert cfg.prepare.source == "phantom-breast" and cfg.controlnet.backbone == "tiny-breast"
    assert cfg.downstream.task == "classification" and cfg.downstream.label_field == "cancer" and cfg.downstream.positive_class == "cancerous"
    assert len(cfg.downstream.seeds) >= 3 and 1.0 in cfg.downstream.fractions and cfg.steering.n_maps > 0
    assert quick_version(cfg).controlnet.steps < cfg.controlnet.steps
    for name, source in (("breast_busi", "busi"), ("breast_cbis_ddsm", "cbis-ddsm"), ("breast_breastmnist", "medmnist")):
        real = load_yaml_config(root / "configs" / f"{name}.yaml", RunConfig)
        assert real.prepare.source == source and real.prepare.root is None and real.downstream.label_map
        assert set(real.downstream.label_map.values()) == {"cancerous", "non-cancerous"}
        quick = quick_version(real)
        assert quick.controlnet.backbone == "tiny-breast" and quick.prepare.size == 64
        mine = overrides(RunConfig, quick.model_dump(), ["prepare.root=/data/x"])
        assert mine.prepare.root == "/data/x"

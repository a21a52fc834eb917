from pathlib import Path

import pytest

from synthmed.config import RunConfig, load_yaml_config, overrides, quick_version, save_config
from synthmed.pipelines import demo_config
from synthmed.core.io import SynthmedError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_shipped_demo_config_is_what_demo_runs():
    assert load_yaml_config(CONFIGS / "demo.yaml", RunConfig) == demo_config(quick=False)
    # and its quick: section is what `synthmed demo --quick` runs
    assert quick_version(load_yaml_config(CONFIGS / "demo.yaml", RunConfig), "demo.yaml") == demo_config(quick=True)


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
    with pytest.raises(SynthmedError, match="optimizer: Input should be .adamw. or .adamw8bit."):
        overrides(ControlNetConfig, {}, ["optimizer=sgd"])


@pytest.mark.parametrize("name", ["data_augmentation", "mask_conditioned_generation", "baseline_generation", "ablations"])
def test_every_experiment_config_and_its_quick_version_validate(name):
    from synthmed.config import RunConfig, load_yaml_config, quick_version

    path = Path(__file__).resolve().parents[2] / "experiments" / f"{name}.yaml"
    cfg = load_yaml_config(path, RunConfig)
    quick = quick_version(cfg, str(path))
    assert cfg.data is None and cfg.prepare.source == "phantom-histology"  # the embedded default as is ...
    assert quick.controlnet.steps < cfg.controlnet.steps and quick.prepare.phantom.n_slides < cfg.prepare.phantom.n_slides
    mine = overrides(RunConfig, cfg.model_dump(), ["data=/my/prepared"])  # ... or a prepared data set by changing one path
    assert mine.data == "/my/prepared" and mine.experiment == cfg.experiment


def test_breast_experiment_and_real_data_configs_validate_with_their_quick_versions():
    from synthmed.config import RunConfig, load_yaml_config, quick_version

    root = Path(__file__).resolve().parents[2]
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


def test_task_models_share_one_training_recipe_and_read_the_earlier_flat_keys():
    """Judges, evaluate's segmenter and domain classifier, the steering classifier and downstream cells all train with
    TaskTrainingConfig (batch size and lr defined once); the earlier flat keys still land in the right group."""
    from synthmed.config import DownstreamConfig, EvaluateConfig, FilterConfig, SteeringConfig, TaskTrainingConfig

    default = TaskTrainingConfig()
    groups = [FilterConfig().segmenter, FilterConfig().classifier, EvaluateConfig().segmenter, EvaluateConfig().domain,
              SteeringConfig().classifier, DownstreamConfig().training]
    assert all(isinstance(g, TaskTrainingConfig) and (g.batch_size, g.lr) == (default.batch_size, default.lr) for g in groups)
    assert [g.steps for g in groups] == [1200, 600, 1200, 600, 600, 1500]
    f = FilterConfig(segmenter_steps=30, batch_size=8)  # batch_size and lr were shared by both judges
    assert (f.segmenter.steps, f.segmenter.batch_size, f.classifier.steps, f.classifier.batch_size) == (30, 8, 600, 8)
    e = overrides(EvaluateConfig, EvaluateConfig(segmenter={"steps": 99, "lr": 1e-3}).model_dump(), ["segmenter_steps=60", "domain_steps=20"])
    assert (e.segmenter.steps, e.segmenter.lr, e.domain.steps) == (60, 1e-3, 20)  # the flat key wins over the dumped group
    assert DownstreamConfig(max_steps=12, batch_size=8).training == TaskTrainingConfig(steps=12, batch_size=8)
    with pytest.raises(SynthmedError, match="segmenter.batch_size"):
        overrides(EvaluateConfig, {}, ["segmenter.batch_size=1"])

"""`train controlnet` end to end (flow function and CLI): every mode writes what plain diffusers loads."""

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline, UNet2DConditionModel

from synthmed import pipelines
from synthmed.config import ConditioningConfig, ControlNetConfig, GenerateConfig, PhantomConfig, PrepareConfig
from synthmed.core.io import SynthmedError, read_json
from synthmed.models.backbone import load_backbone
from synthmed.pipelines.train import changed_settings
from synthmed.testing.cli import run_cli
from synthmed.data.metadata import read_metadata


def _cfg(bb, **kw):
    return ControlNetConfig(**(dict(backbone=str(bb), steps=2, batch_size=4, checkpoint_every=2, log_with=None) | kw))


def test_size_not_divisible_by_the_backbone_is_refused_before_training(tiny_backbone_dir, phantom_data, tmp_path):
    with pytest.raises(SynthmedError, match=r"training size 40x40 is not divisible by 16"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, augment={"crop": [40, 40]}, cache_latents=False), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_settings_are_one_line_errors(tiny_backbone_dir, phantom_data, tmp_path):
    with pytest.raises(SynthmedError, match=r"class_weights names \['necrosis'\]"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, class_weights={"necrosis": 3}), tmp_path / "a")
    with pytest.raises(SynthmedError, match="cache_latents: .*cache=False with random crops"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, augment={"crop": [48, 48]}, cache_latents=True), tmp_path / "b")
    with pytest.raises(SynthmedError, match="depth: depth expects deep, mid or shallow:K"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, depth="half"), tmp_path / "c")
    proc = run_cli("train", "controlnet", "--data", str(phantom_data), "--out", str(tmp_path / "d"), "--set", "lora.rank=-1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: lora.rank: Input should be greater than or equal to 0")


def test_joint_lora_and_controlnet_load_in_plain_diffusers_and_generate(tiny_backbone_dir, phantom_data, tmp_path):
    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, lora={"rank": 2}, lr=1e-2), tmp_path / "run")
    training = read_json(run / "training.json")
    assert training["outputs"] == {"controlnet": "controlnet", "unet_lora": "unet_lora"} and training["lora"]["rank"] == 2
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_backbone_dir, controlnet=ControlNetModel.from_pretrained(run / "controlnet"), safety_checker=None)
    base = pipe.unet.conv_in.weight.clone()
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 64)
    plain = pipe.unet(x, t, e).sample
    pipe.load_lora_weights(run / "unet_lora")  # diffusers' own LoRA loader reads our file
    assert not torch.allclose(pipe.unet(x, t, e).sample, plain) and torch.equal(pipe.unet.conv_in.weight, base)
    syn = pipelines.generate(phantom_data, run, GenerateConfig(n_samples=2, steps=2, batch_size=2), tmp_path / "syn")
    assert len(list((syn / "train" / "images").glob("*.png"))) == 2


def test_text_mode_writes_a_pipeline_folder_and_generates_from_prompts_alone(tiny_backbone_dir, phantom_data, tmp_path):
    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, conditioning_mode="text", lora={"rank": 2}, lr=1e-2), tmp_path / "run")
    assert read_json(run / "training.json")["outputs"] == {"unet_lora": "unet_lora", "backbone": "backbone"}
    tuned = StableDiffusionPipeline.from_pretrained(run / "backbone", safety_checker=None)
    original = load_backbone(tiny_backbone_dir)
    assert not torch.equal(tuned.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight,
                           original.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight)  # LoRA fused in
    assert torch.equal(tuned.unet.conv_in.weight, original.unet.conv_in.weight)
    with pytest.raises(SynthmedError, match="filter.by dice does not apply"):  # its images follow prompts, not masks
        pipelines.generate(phantom_data, run, GenerateConfig(n_samples=1, steps=1, filter={"by": "dice"}), tmp_path / "refused")
    syn = pipelines.generate(phantom_data, run, GenerateConfig(n_samples=2, steps=2, filter={"by": "none"}), tmp_path / "syn")
    rows = read_metadata(syn / "train" / "metadata.jsonl")
    assert len(rows) == 2 and all((syn / "train" / r["file_name"]).is_file() for r in rows)
    assert rows[0]["provenance"]["model_hash"] and rows[0]["provenance"]["source_mask_id"]  # the layout whose prompt it drew, on record


def test_lora_before_then_controlnet_and_an_unlocked_decoder(tiny_backbone_dir, phantom_data, tmp_path):
    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, lora={"rank": 2, "stage": "before", "steps": 2}), tmp_path / "before")
    training = read_json(run / "training.json")
    assert training["backbone"] == str((run / "lora-stage" / "backbone").resolve()) and (run / "controlnet" / "config.json").is_file()
    assert read_json(run / "lora-stage" / "training.json")["conditioning_mode"] == "text"
    # each phase checks its own saved settings on resume: the same ones continue, a stage setting changed is refused
    same = _cfg(tiny_backbone_dir, lora={"rank": 2, "stage": "before", "steps": 2})
    assert changed_settings(run, same) == []  # what a study compares before it reuses a finished model
    assert changed_settings(run, same.model_copy(update={"lr": 1e-3})) == ["lora-stage: lr", "lr"]  # both phases train with it
    pipelines.train_controlnet(phantom_data, same, run, resume=True)
    (run / "training.json").unlink()
    with pytest.raises(SynthmedError, match=r"before: its checkpoints were trained with other settings \(changed: lora-stage: lora.rank, lora-stage: lora.steps, lora-stage: steps\)"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, lora={"rank": 4, "stage": "before", "steps": 3}), run, resume=True)
    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, unet_decoder_lr=1e-2, channels_last=True), tmp_path / "decoder")
    unet, original = UNet2DConditionModel.from_pretrained(run / "unet"), load_backbone(tiny_backbone_dir).unet
    assert torch.equal(unet.down_blocks[0].resnets[0].conv1.weight, original.down_blocks[0].resnets[0].conv1.weight)
    assert not torch.equal(unet.up_blocks[0].resnets[0].conv1.weight, original.up_blocks[0].resnets[0].conv1.weight)


def test_validation_logs_a_loss_and_an_image_grid_to_tensorboard(tiny_backbone_dir, phantom_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, log_with="tensorboard", validation_every=1, validation_samples=2, validation_steps=2), tmp_path / "run")
    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("validation_loss")] == [1, 2]
    image = events.Images("validation")[-1]
    assert image.step == 2 and (image.width, image.height) == (2 * 64, 3 * 64)  # 2 samples; rows mask, real, generated


def test_greyscale_one_channel_conditioning_end_to_end(tiny_backbone_dir, tmp_path):
    data = tmp_path / "grey"
    pipelines.prepare(PrepareConfig(phantom=PhantomConfig(n_slides=4, tiles_per_slide=3, n_unlabelled_slides=0), conditioning=ConditioningConfig(builders=["binary"])), data)
    run = pipelines.train_controlnet(data, _cfg(tiny_backbone_dir), tmp_path / "run")
    assert ControlNetModel.from_pretrained(run / "controlnet").config.conditioning_channels == 1
    syn = pipelines.generate(data, run, GenerateConfig(n_samples=2, steps=2, batch_size=2), tmp_path / "syn")
    assert len(list((syn / "train" / "images").glob("*.png"))) == 2


def test_cli_flags_config_file_and_resume_argument(tiny_backbone_dir, phantom_data, tmp_path):
    (tmp_path / "train.yaml").write_text("steps: 2\nbatch_size: 4\nlog_with: null\nlora:\n  rank: 2\n")
    out = tmp_path / "run"
    proc = run_cli("train", "controlnet", "--data", str(phantom_data), "--out", str(out), "--backbone", str(tiny_backbone_dir),
                   "--config", str(tmp_path / "train.yaml"), "--depth", "mid", "--set", "checkpoint_every=1", "--set", "lora.alpha=4")
    assert proc.returncode == 0, proc.stderr
    saved = (out / "train_config.yaml").read_text()
    assert "depth: mid" in saved and "rank: 2" in saved and "alpha: 4" in saved and "steps: 2" in saved
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    proc = run_cli("train", "controlnet", "--data", str(phantom_data), "--out", str(out), "--resume", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "--resume expects 'latest' or a checkpoint folder" in proc.stderr
    # its checkpoints were trained with depth mid, LoRA and lr 1e-4: continuing them with other settings is refused in one line
    proc = run_cli("train", "controlnet", "--data", str(phantom_data), "--out", str(out), "--backbone", str(tiny_backbone_dir),
                   "--config", str(tmp_path / "train.yaml"), "--lr", "0.01", "--set", "checkpoint_every=5", "--resume", "latest")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{out}: its checkpoints were trained with other settings (changed: depth, lora.alpha, lr)" in proc.stderr


def test_an_interrupted_run_asks_for_resume(tiny_backbone_dir, phantom_data, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(SynthmedError, match="interrupted run's checkpoints; add --resume latest"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir), out)


def test_resume_latest_without_a_checkpoint_says_it_starts_at_step_0(tiny_backbone_dir, phantom_data, tmp_path, capsys):
    out = tmp_path / "run"
    pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, steps=1), out, resume="latest")
    assert f"note: --resume latest: no checkpoint in {out / 'checkpoints'}, so training starts at step 0" in capsys.readouterr().err
    record = read_json(out / "training.json")
    assert [(r["from_step"], r["to_step"]) for r in record["runs"]] == [(0, 1)] and not record["resumed"]


def test_generation_uses_the_prompts_the_model_was_trained_with(tiny_backbone_dir, phantom_data, tmp_path):
    from synthmed.data.prepared import load_split

    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, steps=1, prompt_source="label", label_prompt="h&e, {label} tissue"), tmp_path / "label")
    syn = load_split(pipelines.generate(phantom_data, run, GenerateConfig(n_samples=2, steps=1, batch_size=2), tmp_path / "syn"), "train")
    labels = {r["id"]: r["label"] for r in load_split(phantom_data, "train").rows}
    # provenance.prompt is what the model read; `text` stays the data set's description of the (new) layout
    assert [r["provenance"]["prompt"] for r in syn.rows] == [f"h&e, {labels[r['provenance']['source_mask_id']]} tissue" for r in syn.rows]
    assert all(r["text"].startswith("h&e histology") for r in syn.rows)
    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, steps=1, conditioning_mode="mask"), tmp_path / "mask")
    syn = load_split(pipelines.generate(phantom_data, run, GenerateConfig(n_samples=2, steps=1, batch_size=2), tmp_path / "syn2"), "train")
    assert [r["provenance"]["prompt"] for r in syn.rows] == ["", ""]


def test_a_fine_tuned_decoder_is_saved_and_is_what_sampling_and_the_round_trip_use(tiny_backbone_dir, phantom_data, tmp_path):
    from synthmed.config import EvaluateConfig
    from synthmed.models.trained import load_trained, read_training

    cfg = _cfg(tiny_backbone_dir, decoder={"steps": 2, "batch_size": 4, "crop": 16, "lr": 1e-2, "class_weights": {"dead": 20.0}})
    run = pipelines.train_controlnet(phantom_data, cfg, tmp_path / "run")
    training = read_training(run)
    assert training["outputs"]["vae"] == "vae" and training["output_hashes"]["vae"]
    assert training["decoder"]["steps"] == 2 and training["decoder"]["class_weights"] == {"dead": 20.0}
    bb, _, _ = load_trained(run, training)
    plain = load_backbone(tiny_backbone_dir)
    assert torch.equal(bb.vae.encoder.conv_in.weight, plain.vae.encoder.conv_in.weight)
    assert not torch.equal(bb.vae.decoder.conv_out.weight, plain.vae.decoder.conv_out.weight)
    base = pipelines.roundtrip(phantom_data, str(tiny_backbone_dir), EvaluateConfig(), tmp_path / "rt0", judge=False)
    tuned = pipelines.roundtrip(phantom_data, str(tiny_backbone_dir), EvaluateConfig(), tmp_path / "rt1", judge=False, model=run)
    assert tuned["inputs"]["model"] == str(run.resolve()) and tuned["mae"] != base["mae"]
    with pytest.raises(SynthmedError, match="necrosis"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, decoder={"steps": 1, "class_weights": {"necrosis": 3}}), tmp_path / "bad")
    with pytest.raises(SynthmedError, match="decoder.steps"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, conditioning_mode="text", decoder={"steps": 1}), tmp_path / "text")


def test_a_conditioned_refiner_is_saved_and_is_what_generation_and_the_round_trip_use(tiny_backbone_dir, phantom_data, tmp_path):
    from synthmed.config import EvaluateConfig
    from synthmed.data.prepared import load_split
    from synthmed.models.refiner import ConditionedRefiner
    from synthmed.models.trained import load_trained, read_training

    cfg = _cfg(tiny_backbone_dir, decoder={"class_weights": {"dead": 20.0}, "refiner": {"steps": 3, "batch_size": 4, "crop": 16, "width": 8, "lr": 1e-2}})
    run = pipelines.train_controlnet(phantom_data, cfg, tmp_path / "run")
    training = read_training(run)
    assert training["outputs"]["refiner"] == "refiner" and "vae" not in training["outputs"] and training["output_hashes"]["refiner"]
    assert training["decoder"]["refiner"]["steps"] == 3 and training["decoder"]["refiner"]["final_loss"] > 0
    bb, _, _ = load_trained(run, training)
    assert isinstance(bb.refiner, ConditionedRefiner) and bb.refiner.shape == {"cond_channels": 3, "width": 8, "depth": 5}
    assert bb.refiner.out.weight.abs().sum() > 0  # trained: no longer the identity
    rt = pipelines.roundtrip(phantom_data, str(tiny_backbone_dir), EvaluateConfig(), tmp_path / "rt", judge=False, model=run)
    assert rt["refined"]["mae"] != rt["mae"] and rt["refined"]["mae"]["dead"]["n"] == rt["mae"]["dead"]["n"]
    syn = load_split(pipelines.generate(phantom_data, run, GenerateConfig(n_samples=2, steps=1, batch_size=2), tmp_path / "syn"), "train")
    assert all(r["provenance"]["trained_parts"]["refiner"] == training["output_hashes"]["refiner"] for r in syn.rows)
    with pytest.raises(SynthmedError, match="decoder.refiner.steps"):
        pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, conditioning_mode="text", decoder={"refiner": {"steps": 1}}), tmp_path / "text")



def test_a_refiner_of_whole_images_builds_the_latent_cache_that_the_controlnet_then_reads(tiny_backbone_dir, phantom_data, tmp_path):
    from synthmed.models.trained import read_training

    cfg = _cfg(tiny_backbone_dir, decoder={"refiner": {"steps": 2, "batch_size": 4, "width": 8}})  # crop 64: whole 64 px tiles
    training = read_training(pipelines.train_controlnet(phantom_data, cfg, tmp_path / "run"))
    assert training["decoder"]["refiner"]["cached_latents"] is True
    assert training["latent_cache"]["reused"] is True and training["latent_cache"]["encoded_here"] == 0  # encoded once, for both
    small = _cfg(tiny_backbone_dir, decoder={"refiner": {"steps": 2, "batch_size": 4, "width": 8, "crop": 16}})
    training = read_training(pipelines.train_controlnet(phantom_data, small, tmp_path / "crops"))
    assert training["decoder"]["refiner"]["cached_latents"] is False  # 16 px crops: each step encodes its own


def _wandb_records(path) -> list[dict]:
    """The history rows of a W&B run file, read the way `wandb sync` reads it: a 7-byte header, then 32 KiB
    blocks of LevelDB-style records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) of protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # block padding
            pos += left - 7
            continue
        buf, pos = buf + raw[pos:pos + length], pos + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_losses_and_validation_grids(tiny_backbone_dir, phantom_data, tmp_path, monkeypatch):
    """W&B in offline mode (the default: nothing leaves the machine): the run folder `wandb sync` uploads holds
    every step's loss and the validation grids as media."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, log_with="wandb", validation_every=1, validation_samples=2, validation_steps=2), tmp_path / "run")
    (folder,) = (run / "logs" / "wandb").glob("offline-run-*")
    grids = sorted((folder / "files" / "media" / "images").glob("validation_*.png"))
    assert len(grids) == 2  # steps 1 and 2
    from PIL import Image

    assert Image.open(grids[-1]).size == (2 * 64, 3 * 64)  # 2 samples; rows mask, real, generated
    history = [r for r in _wandb_records(next(folder.glob("run-*.wandb"))) if r]
    losses = read_json(run / "training.json")["last_losses"]
    logged = [float(h["loss"]) for h in history if "loss" in h]
    assert logged == pytest.approx(losses[-len(logged):]) and len(logged) == 2
    assert sum("validation_loss" in h for h in history) == 2


def test_mlflow_local_store_holds_the_losses_and_validation_grids(tiny_backbone_dir, phantom_data, tmp_path, monkeypatch):
    """MLflow with no server named: a SQLite store under OUT/logs that `mlflow ui --backend-store-uri` reads."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = pipelines.train_controlnet(phantom_data, _cfg(tiny_backbone_dir, log_with="mlflow", validation_every=1, validation_samples=2, validation_steps=2), tmp_path / "run")
    client = mlflow.MlflowClient(f"sqlite:///{(run / 'logs' / 'mlflow.db').resolve()}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "train"]
    (found,) = client.search_runs([experiment.experiment_id])
    losses = read_json(run / "training.json")["last_losses"]
    assert [m.value for m in client.get_metric_history(found.info.run_id, "loss")] == pytest.approx(losses[-2:])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "validation_loss")] == [1, 2]
    images = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    assert sum(p.startswith("images/validation+step+") and p.endswith(".png") and "compressed" not in p for p in images) == 2
    assert (run / "logs" / "mlflow-artifacts").is_dir()

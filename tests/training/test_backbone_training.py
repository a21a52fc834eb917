import numpy as np

from synthmed import pipelines
from synthmed.config import BackboneConfig
from synthmed.data.prepared import load_split
from synthmed.models.backbone import build_backbone, load_backbone, read_recipe
from synthmed.training.backbone import train_vae


def test_train_backbone_writes_a_loadable_folder_with_its_recipe(phantom_data, tmp_path):
    cfg = BackboneConfig(vae_steps=2, unet_steps=2, vae_batch_size=4, unet_batch_size=4)
    out = pipelines.train_backbone(phantom_data, cfg, tmp_path / "bb")
    recipe = read_recipe(out)
    assert recipe["config"]["vae_steps"] == 2 and recipe["data"]["split"] == "unlabelled"
    rt = recipe["round_trip"]  # what the new VAE keeps of each class, on the labelled validation split
    assert rt["split"] == "validation" and rt["unit"] == "pixels" and set(rt["mae"]) >= {"background", "dead"} and rt["rare_class"]
    loaded = load_backbone(out)
    assert loaded.vae.config.scaling_factor != 0.18215  # fitted to the data's latent spread
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_vae_training_reduces_reconstruction_loss(phantom_data):
    images = load_split(phantom_data, "train").images
    cfg = BackboneConfig(vae_steps=40, vae_batch_size=8, vae_crop=32, vae_lr=2e-3)
    losses = train_vae(build_backbone("tiny", seed=1), images, cfg)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_interrupted_backbone_training_resumes_exactly(phantom_data, tmp_path, monkeypatch):
    import pytest
    import torch

    from synthmed.core.io import SynthmedError
    from synthmed.training import backbone as tb

    cfg = BackboneConfig(vae_steps=3, unet_steps=4, vae_batch_size=4, unet_batch_size=4, checkpoint_every=2)
    straight = load_backbone(pipelines.train_backbone(phantom_data, cfg, tmp_path / "a"))

    real = tb.train_text_to_image

    def crash_after_three(*args, **kwargs):
        kwargs.pop("progress", None)

        def progress(done, total, loss):
            if done == 3:
                raise KeyboardInterrupt

        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(tb, "train_text_to_image", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        pipelines.train_backbone(phantom_data, cfg, tmp_path / "b")
    assert not (tmp_path / "b").exists() and (tmp_path / "b.partial" / "unet.pt").is_file()
    with pytest.raises(SynthmedError, match="--resume"):
        pipelines.train_backbone(phantom_data, cfg, tmp_path / "b")
    steps_run = []

    def recording(real_fn):
        def wrapper(*args, **kwargs):
            kwargs.pop("progress", None)
            return real_fn(*args, progress=lambda done, total, loss: steps_run.append((real_fn.__name__, done)), **kwargs)

        return wrapper

    monkeypatch.setattr(tb, "train_vae", recording(tb.train_vae))
    monkeypatch.setattr(tb, "train_text_to_image", recording(real))
    resumed = load_backbone(pipelines.train_backbone(phantom_data, cfg, tmp_path / "b", resume=True))
    # The VAE phase was complete and the UNet had a checkpoint at step 2: only steps 3-4 run again.
    assert steps_run == [("train_text_to_image", 3), ("train_text_to_image", 4)]
    assert not (tmp_path / "b.partial").exists()
    for name in ("vae", "unet"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert straight.vae.config.scaling_factor == pytest.approx(resumed.vae.config.scaling_factor)


def test_backbone_training_reads_a_split_on_disk_by_batches_with_the_same_weights(phantom_data, tmp_path, monkeypatch):
    """`train backbone` on an unlabelled split decoded to disk, with whole reads refused: the same weights."""
    import torch

    cfg = BackboneConfig(vae_steps=3, unet_steps=2, vae_batch_size=4, unet_batch_size=4, vae_crop=32)
    memory = load_backbone(pipelines.train_backbone(phantom_data, cfg, tmp_path / "memory"))
    monkeypatch.setenv("SYNTHMED_LAZY_BYTES", "1")
    monkeypatch.setenv("SYNTHMED_ROWS_ONLY", "1")
    monkeypatch.setenv("SYNTHMED_CACHE", str(tmp_path / "cache"))
    disk = load_backbone(pipelines.train_backbone(phantom_data, cfg, tmp_path / "disk"))
    assert list((tmp_path / "cache" / "arrays").iterdir())
    for part in ("vae", "unet"):
        a, b = getattr(memory, part).state_dict(), getattr(disk, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert disk.vae.config.scaling_factor == memory.vae.config.scaling_factor

import numpy as np

from synthmed import flow
from synthmed.config import BackboneConfig
from synthmed.data.prepared import load_split
from synthmed.models.backbone import build_backbone, load_backbone, read_recipe
from synthmed.training.backbone import train_vae


def test_train_backbone_writes_a_loadable_folder_with_its_recipe(phantom_data, tmp_path):
    cfg = BackboneConfig(vae_steps=2, unet_steps=2, vae_batch_size=4, unet_batch_size=4)
    out = flow.train_backbone(phantom_data, cfg, tmp_path / "bb")
    recipe = read_recipe(out)
    assert recipe["config"]["vae_steps"] == 2 and recipe["data"]["split"] == "unlabelled"
    loaded = load_backbone(out)
    assert loaded.vae.config.scaling_factor != 0.18215  # fitted to the data's latent spread
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_vae_training_reduces_reconstruction_loss(phantom_data):
    images = load_split(phantom_data, "train").images
    cfg = BackboneConfig(vae_steps=40, vae_batch_size=8, vae_crop=32, vae_lr=2e-3)
    losses = train_vae(build_backbone("tiny", seed=1), images, cfg)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])

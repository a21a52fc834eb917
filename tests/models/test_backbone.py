import pytest
import torch

from synthmed.io import SynthmedError
from synthmed.models.backbone import build_backbone, load_backbone
from synthmed.models.controlnet import build_controlnet, embedding_channels, load_controlnet
from synthmed.models.registry import get_preset


def test_tiny_preset_is_the_sd_architecture_at_small_size():
    bb = build_backbone("tiny")
    assert type(bb.vae).__name__ == "AutoencoderKL" and type(bb.unet).__name__ == "UNet2DConditionModel"
    assert bb.vae_scale_factor == 4 and bb.resolution == 64
    z = bb.encode_images(torch.zeros(2, 3, 64, 64))
    assert z.shape == (2, 4, 16, 16)
    assert bb.encode_prompts(["h&e histology", ""]).shape == (2, 77, bb.unet.config.cross_attention_dim)


def test_save_and_load_round_trip(tiny_backbone_dir):
    loaded = load_backbone(tiny_backbone_dir)
    fresh = build_backbone("tiny", seed=0)
    for name, module in fresh.modules().items():
        a, b = module.state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer("colon tissue").input_ids == fresh.tokenizer("colon tissue").input_ids
    assert (tiny_backbone_dir / "tokenizer" / "merges.txt").is_file()


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(SynthmedError, match="unknown backbone"):
        load_backbone("no-such-thing")
    with pytest.raises(SynthmedError, match="no model_index.json"):
        load_backbone(tmp_path)
    with pytest.raises(SynthmedError, match="cannot load backbone"):
        load_backbone("someone/not-in-local-cache")
    with pytest.raises(SynthmedError, match="no pretrained weights"):
        load_backbone("sd15")
    with pytest.raises(ValueError, match="get_preset expects"):
        get_preset("huge")


def test_controlnet_matches_the_backbone(tmp_path, tiny_backbone_dir):
    bb = load_backbone(tiny_backbone_dir)
    cn = build_controlnet(bb.unet, bb.vae_scale_factor)
    assert embedding_channels(8) == (16, 32, 96, 256) and embedding_channels(4) == (16, 32, 96)
    lat = torch.randn(2, 4, 16, 16)
    down, mid = cn(lat, torch.tensor([10, 500]), torch.randn(2, 77, 64), controlnet_cond=torch.rand(2, 3, 64, 64), return_dict=False)
    assert mid.abs().max() == 0  # zero convolutions: an untrained ControlNet changes nothing
    cn.save_pretrained(tmp_path / "cn", safe_serialization=True)
    assert (tmp_path / "cn" / "diffusion_pytorch_model.safetensors").is_file()
    assert isinstance(load_controlnet(tmp_path / "cn"), type(cn))
    with pytest.raises(SynthmedError, match="not a ControlNet folder"):
        load_controlnet(tmp_path)

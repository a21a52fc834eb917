"""The real SD architectures (sd15, sd21, sd21-base) built small, and single files in their real layout."""

import pytest
import torch

from synthmed.models.backbone import build_backbone, detect_preset, load_backbone
from synthmed.models.registry import PRESETS, get_preset
from synthmed.testing import single_file

# What the real checkpoints have: (text width, UNet attention heads, linear projections, prediction, resolution)
REAL = {
    "sd15": (768, 8, False, "epsilon", 512),
    "sd21": (1024, [5, 10, 20, 20], True, "v_prediction", 768),
    "sd21-base": (1024, [5, 10, 20, 20], True, "epsilon", 512),
}
HUB_IDS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1",
           "sd21-base": "stabilityai/stable-diffusion-2-1-base"}


@pytest.mark.parametrize("name", sorted(REAL))
def test_presets_describe_the_real_models(name):
    width, heads, linear, prediction, resolution = REAL[name]
    p = get_preset(name)
    assert p.text_encoder["hidden_size"] == width and p.unet["cross_attention_dim"] == width
    assert list(p.unet["attention_head_dim"]) == heads if isinstance(heads, list) else p.unet["attention_head_dim"] == heads
    assert p.unet.get("use_linear_projection", False) is linear
    assert p.scheduler["prediction_type"] == prediction
    assert p.resolution == resolution == p.unet["sample_size"] * p.vae_scale_factor == p.vae["sample_size"]
    assert p.hub_id == HUB_IDS[name]
    small = p.at_sample_size(8)
    assert (small.unet["sample_size"], small.vae["sample_size"], small.resolution) == (8, 64, 64)
    assert PRESETS[name].unet["sample_size"] == resolution // 8  # the registry itself is left as it was


def test_sample_size_is_validated():
    for bad in (0, -8, 8.0, True):
        with pytest.raises(ValueError, match="at_sample_size expects a positive int"):
            get_preset("tiny").at_sample_size(bad)


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def small_real(request):
    """The real architecture with random weights at 64 px (8x8 latents); one alive at a time (~4-5 GB)."""
    yield request.param, build_backbone(request.param, seed=0, sample_size=8)


def test_real_architecture_at_a_small_size(small_real):
    name, bb = small_real
    width = REAL[name][0]
    assert bb.unet.config.block_out_channels == (320, 640, 1280, 1280) and bb.unet.config.layers_per_block == 2
    assert bb.unet.config.cross_attention_dim == width and bb.text_encoder.config.hidden_size == width
    assert bb.text_encoder.config.num_hidden_layers == (12 if name == "sd15" else 23)
    assert bb.vae.config.block_out_channels == (128, 256, 512, 512) and bb.vae_scale_factor == 8
    assert (bb.unet.config.sample_size, bb.vae.config.sample_size, bb.resolution) == (8, 64, 64)
    assert bb.scheduler.config.prediction_type == REAL[name][3]
    context = bb.encode_prompts(["colon tissue"])
    assert context.shape == (1, 77, width)
    with torch.no_grad():
        out = bb.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), context).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_real_layout_single_file_round_trip(small_real, tmp_path):
    """The file has the key names of v1-5-pruned-emaonly / v2-1_768-ema-pruned and loads back without a config."""
    name, bb = small_real
    path = single_file.write(tmp_path / f"{name}-random.safetensors", bb)
    try:
        sd = single_file.ldm_state_dict(bb)
        assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
        for key in ("model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.output_blocks.2.1.conv.weight",
                    "model.diffusion_model.output_blocks.5.2.conv.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
                    "first_stage_model.decoder.up.3.block.2.conv1.weight", "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"):
            assert key in sd, key
        text = "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" if name == "sd15" else \
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"
        assert text in sd
        assert detect_preset(path).name == name
        loaded = load_backbone(path)
        assert loaded.unet.config.sample_size == get_preset(name).unet["sample_size"]  # configs from the preset
        assert loaded.scheduler.config.prediction_type == REAL[name][3]
        for part, module in bb.modules().items():
            a, b = module.state_dict(), getattr(loaded, part).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        if name == "sd21":  # the same SD 2.x file as the 512 px epsilon base model
            base = load_backbone(path, config="sd21-base")
            assert base.scheduler.config.prediction_type == "epsilon" and base.resolution == 512
    finally:
        path.unlink()

import numpy as np
import pytest
import torch

from synthmed.data.prepared import load_conditioning, load_split
from synthmed.generation.sample import SCHEDULERS, SamplingSettings, controlnet_pipeline, sample_images
from synthmed.models.backbone import load_backbone
from synthmed.models.controlnet import build_controlnet


@pytest.fixture(scope="module")
def pipe(tiny_backbone_dir):
    bb = load_backbone(tiny_backbone_dir).freeze()
    torch.manual_seed(0)
    cn = build_controlnet(bb.unet, bb.vae_scale_factor)
    with torch.no_grad():  # make the ControlNet's output matter, as after training
        cn.controlnet_mid_block.weight.normal_(0, 0.05)
    return controlnet_pipeline(bb, cn, "ddim")


def test_sample_i_does_not_depend_on_the_batch(pipe, phantom_data):
    split = load_split(phantom_data, "train", need_masks=True)
    cond, prompts = load_conditioning(split)[:3], split.prompts[:3]
    settings = SamplingSettings("ddim", steps=3, guidance_scale=2.0)
    together = sample_images(pipe, cond, prompts, [11, 12, 13], settings)
    alone = np.concatenate([sample_images(pipe, cond[i : i + 1], prompts[i : i + 1], [11 + i], settings) for i in range(3)])
    assert together.shape == (3, 64, 64, 3) and together.dtype == np.uint8
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 2
    other_seed = sample_images(pipe, cond[:1], prompts[:1], [99], settings)
    assert np.abs(other_seed.astype(int) - alone[:1].astype(int)).mean() > 1


def test_settings_are_validated():
    assert set(SCHEDULERS) == {"ddim", "unipc", "dpm", "euler"}
    with pytest.raises(ValueError, match="scheduler"):
        SamplingSettings("pndm")

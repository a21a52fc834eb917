"""The real SD architectures (random weights, small sample size): shapes and wiring of training."""

from types import SimpleNamespace

import numpy as np
import pytest
from accelerate import Accelerator

from synthmed.config import ControlNetConfig
from synthmed.models.controlnet import parse_depth, residual_blocks
from synthmed.models.registry import get_preset


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd21-base"])
def test_depth_maps_to_sd_residuals(name):
    unet = get_preset(name).unet
    owners = residual_blocks(SimpleNamespace(down_block_types=unet["down_block_types"], layers_per_block=unet["layers_per_block"]))
    assert owners == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]  # conv_in + 3 per block with downsampler, 2 in the last
    assert parse_depth("shallow", 4) == (2, False) and parse_depth("shallow:1", 4) == (1, False) and parse_depth("mid", 4) == (0, True)


@pytest.mark.slow
@pytest.mark.parametrize("name, prediction", [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_one_training_step_on_the_real_architecture(name, prediction, tmp_path):
    from synthmed.models.backbone import build_backbone
    from synthmed.models.controlnet import ControlledUNet, build_controlnet
    from synthmed.training.batches import build_training_data
    from synthmed.training.controlnet import train

    bb = build_backbone(name, seed=0, sample_size=8).freeze()  # 64 px images
    assert bb.scheduler.config.prediction_type == prediction
    cn = build_controlnet(bb.unet, bb.vae_scale_factor, depth="shallow:2")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    data = build_training_data(bb, images, images.copy(), ["a", "b"], flips=False)
    cfg = ControlNetConfig(steps=1, batch_size=1, checkpoint_every=1, log_with=None, gradient_checkpointing=True)
    cn.enable_gradient_checkpointing()
    losses = train(ControlledUNet(bb.unet, cn), bb, data, cfg, Accelerator(cpu=True), tmp_path)
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert cn.controlnet_down_blocks[0].weight.abs().sum() > 0 and cn.controlnet_mid_block.weight.abs().sum() == 0

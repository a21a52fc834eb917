import numpy as np
import pytest
import torch

from synthmed.data.prepared import load_conditioning, load_split
from synthmed.models.sampling import controlnet_pipeline, sample_images, SamplingSettings, SCHEDULERS
from synthmed.generation.sample import Sampler
from synthmed.models.backbone import load_backbone
from synthmed.models.controlnet import build_controlnet


@pytest.fixture(scope="module")
def parts(tiny_backbone_dir):
    bb = load_backbone(tiny_backbone_dir).freeze()
    torch.manual_seed(0)
    cn = build_controlnet(bb.unet, bb.vae_scale_factor)
    with torch.no_grad():  # make the ControlNet's output matter, as after training
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    return bb, cn


@pytest.fixture(scope="module")
def inputs(phantom_data):
    split = load_split(phantom_data, "train", need_masks=True)
    return load_conditioning(split)[:5], split.prompts[:5]


def _contiguous(bb, cn):
    for m in (bb.unet, bb.vae, cn):
        m.to(memory_format=torch.contiguous_format)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("options", [{}, {"guess_mode": True}, {"control_start": 0.3, "control_end": 0.7}, {"negative_prompt": "blurry", "conditioning_scale": 0.5}, {"guidance_scale": 1.0}])
def test_the_sampler_draws_exactly_what_the_diffusers_pipeline_draws(parts, inputs, scheduler, options):
    bb, cn = parts
    _contiguous(bb, cn)
    cond, prompts = inputs[0][:4], inputs[1][:4]  # a multiple of the row block: the same kernels as the sampler
    settings = SamplingSettings(**{"scheduler": scheduler, "steps": 3, "guidance_scale": 2.0, **options})
    ref = sample_images(controlnet_pipeline(bb, cn, scheduler), cond, prompts, [5, 6, 7, 8], settings)
    ours = Sampler(bb, cn, settings, channels_last=False)(cond, prompts, [5, 6, 7, 8])
    assert np.array_equal(ref, ours)


@pytest.mark.parametrize("options", [{}, {"guess_mode": True}, {"guidance_scale": 1.0}])
def test_sample_i_is_bit_identical_whatever_the_batch(parts, inputs, options):
    bb, cn = parts
    cond, prompts = inputs
    sampler = Sampler(bb, cn, SamplingSettings(**{"scheduler": "dpm", "steps": 3, "guidance_scale": 2.0, **options}))
    seeds = [11, 12, 13, 14, 15]
    together = sampler(cond, prompts, seeds)
    alone = np.concatenate([sampler(cond[i : i + 1], prompts[i : i + 1], seeds[i : i + 1]) for i in range(5)])
    pairs = np.concatenate([sampler(cond[i : i + 2], prompts[i : i + 2], seeds[i : i + 2]) for i in range(0, 5, 2)])
    assert together.shape == (5, 64, 64, 3) and together.dtype == np.uint8
    assert np.array_equal(together, alone) and np.array_equal(together, pairs)
    other_seed = sampler(cond[:1], prompts[:1], [99])
    assert np.abs(other_seed.astype(int) - alone[:1].astype(int)).mean() > 1


def test_the_conditioning_and_the_controlnet_window_change_the_image(parts, inputs):
    bb, cn = parts
    cond, prompts = inputs[0][:2], inputs[1][:2]
    draw = lambda **kw: Sampler(bb, cn, SamplingSettings(**{"scheduler": "ddim", "steps": 4, **kw}))(cond, prompts, [1, 2])  # noqa: E731
    base = draw()
    assert np.abs(base.astype(int) - draw(control_end=0.25).astype(int)).mean() > 0.5
    assert np.abs(base.astype(int) - draw(conditioning_scale=0.0).astype(int)).mean() > 0.5
    assert np.array_equal(draw(conditioning_scale=0.0), draw(control_start=0.5, control_end=0.75, conditioning_scale=0.0))


def test_settings_are_validated():
    assert set(SCHEDULERS) == {"ddim", "unipc", "dpm", "euler"}
    with pytest.raises(ValueError, match="scheduler"):
        SamplingSettings("pndm")
    with pytest.raises(ValueError, match="control_start"):
        SamplingSettings(control_start=0.8, control_end=0.2)


def test_a_sampler_without_controlnet_draws_from_prompts(tiny_backbone_dir):
    bb = load_backbone(tiny_backbone_dir).freeze()
    images = Sampler(bb, None, SamplingSettings("ddim", steps=2))(None, ["h&e histology", "h&e histology"], [1, 2], size=(64, 64))
    assert images.shape == (2, 64, 64, 3) and not np.array_equal(images[0], images[1])
    with pytest.raises(ValueError, match="conditioning"):
        Sampler(bb, None, SamplingSettings())(np.zeros((1, 64, 64, 3), np.uint8), ["x"], [1])


def test_a_refiner_on_the_backbone_refines_what_the_sampler_decodes_with_each_samples_conditioning(parts, inputs):
    from synthmed.models.refiner import ConditionedRefiner

    bb, cn = parts
    cond, prompts = inputs[0][:4], inputs[1][:4]
    settings = SamplingSettings("ddim", steps=2)
    plain = Sampler(bb, cn, settings)(cond, prompts, [1, 2, 3, 4])
    refiner = ConditionedRefiner(cond.shape[-1], width=4, depth=2)
    with torch.no_grad():  # adds red where the conditioning's red channel (neoplastic in the palette) is on
        refiner.body[0].weight.zero_()
        refiner.body[0].weight[0, 3] = 10.0  # hidden 0 = SiLU(10 x (2 r - 1)): about 10 on red pixels, 0 elsewhere
        refiner.out.weight.zero_()
        refiner.out.weight[0, 0, 1, 1] = 0.05
    bb.refiner = refiner.eval()
    try:
        refined = Sampler(bb, cn, settings)(cond, prompts, [1, 2, 3, 4])
    finally:
        bb.refiner = None
    red = cond[..., 0] > 127
    lift = refined[..., 0].astype(int) - plain[..., 0].astype(int)
    assert red.any() and (lift[red] > 40).mean() > 0.9  # +0.5 in [-1, 1] is about +64 grey levels, unless clamped at 255
    assert (lift[~red] == 0).mean() > 0.95 and np.array_equal(refined[..., 1:], plain[..., 1:])

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from synthmed.data.prepared import load_conditioning, load_split
from synthmed.models.backbone import load_backbone
from synthmed.models.controlnet import build_controlnet
from synthmed.training.common import dihedral, warmup_cosine
from synthmed.training.controlnet import cache_training_data, latest_checkpoint, train_controlnet


@pytest.fixture(scope="module")
def setup(tiny_backbone_dir, phantom_data):
    bb = load_backbone(tiny_backbone_dir).freeze()
    split = load_split(phantom_data, "train", need_masks=True)
    data = cache_training_data(bb, split.images[:8], load_conditioning(split)[:8], split.prompts[:8])
    return bb, data


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=1e-3, prompt_dropout=0.3, checkpoint_every=3, seed=0)
    return SimpleNamespace(**(base | kw))


def test_cache_holds_all_eight_views_with_matching_masks(setup):
    bb, data = setup
    assert data.latents.shape == (8, 8, 4, 16, 16) and data.conditioning.shape == (8, 8, 3, 64, 64)
    assert torch.equal(data.conditioning[:, 5], dihedral(data.conditioning[:, 0], 5))
    assert data.prompt_table.shape[0] == len(set(data.prompt_index.tolist())) + 1  # + empty prompt


def test_training_moves_the_zero_convolutions(setup, tmp_path):
    bb, data = setup
    cn = build_controlnet(bb.unet, bb.vae_scale_factor)
    losses = train_controlnet(bb, cn, data, _cfg(steps=3, checkpoint_every=100), Accelerator(cpu=True), tmp_path)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert cn.controlnet_mid_block.weight.abs().sum() > 0


def test_interrupted_then_resumed_equals_uninterrupted(setup, tmp_path):
    bb, data = setup
    torch.manual_seed(0)
    straight = build_controlnet(bb.unet, bb.vae_scale_factor)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    train_controlnet(bb, straight, data, _cfg(), Accelerator(cpu=True), tmp_path / "a")

    def crash(done, total, loss):
        if done == 4:
            raise KeyboardInterrupt

    first = build_controlnet(bb.unet, bb.vae_scale_factor)
    first.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        train_controlnet(bb, first, data, _cfg(), Accelerator(cpu=True), tmp_path / "b", progress=crash)
    assert latest_checkpoint(tmp_path / "b")[0] == 3
    resumed = build_controlnet(bb.unet, bb.vae_scale_factor)
    resumed.load_state_dict(init)
    ran = train_controlnet(bb, resumed, data, _cfg(), Accelerator(cpu=True), tmp_path / "b", resume=True)
    assert len(ran) == 3  # steps 4..6 only: the first three came from the checkpoint
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_schedule_warms_up_and_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[4] == max(lrs) and lrs[-1] == pytest.approx(0.1, abs=0.01)

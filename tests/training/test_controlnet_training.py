import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synthmed.training.common import dihedral, warmup_cosine
from synthmed.training.controlnet import latest_checkpoint, read_history
from synthmed.testing.training import close, data_for, run_training


def test_cache_holds_every_view_and_the_conditioning_once(tiny):
    load, arrays = tiny
    data = data_for(load(), arrays)
    assert data.latents.shape == (8, 8, 4, 16, 16) and data.conditioning.shape == (8, 3, 64, 64)
    assert data.prompt_table.shape[0] == len(set(data.prompt_index.tolist())) + 1  # + empty prompt
    aug = data.draw(4, torch.Generator().manual_seed(1))
    latents, cond, masks = data.batch(load(), torch.arange(4), aug)
    for i, v in enumerate(aug.views.tolist()):  # conditioning and mask get the image's view
        assert torch.equal(cond[i], dihedral(data.conditioning[i], v).float() / 255)
        assert torch.equal(masks[i], dihedral(data.masks[i], v))
        assert torch.equal(latents[i], data.latents[i, v])


def test_training_moves_the_zero_convolutions_and_leaves_the_backbone(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    before = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    model, losses = run_training(bb, data_for(bb, arrays), tmp_path)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert model.controlnet.controlnet_mid_block.weight.abs().sum() > 0
    assert close(before, bb.unet.state_dict(), atol=0)


def test_interrupted_then_resumed_equals_uninterrupted(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    data = data_for(bb, arrays)
    straight, straight_losses = run_training(bb, data, tmp_path / "a", steps=6, checkpoint_every=3)

    def crash(done, total, loss):
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(load(), data, tmp_path / "b", steps=6, checkpoint_every=3, progress=crash)
    assert latest_checkpoint(tmp_path / "b")[0] == 3
    ckpt = tmp_path / "b" / "step-3"
    names = set(load_file(ckpt / "model.safetensors"))
    assert names and all(n.startswith("controlnet.") for n in names)  # trainable weights only, not the frozen UNet
    resumed, ran = run_training(load(), data, tmp_path / "b", steps=6, checkpoint_every=3, resume="latest")
    # every step's loss: the first three from the checkpoint's history, the last three from this run
    assert ran == pytest.approx(straight_losses, abs=1e-6) and len(ran) == 6
    assert close(straight.controlnet.state_dict(), resumed.controlnet.state_dict(), atol=1e-6)
    runs = read_history(tmp_path / "b" / "step-6")["runs"]
    assert [(r["from_step"], r["to_step"]) for r in runs] == [(0, 3), (3, 6)]  # both invocations recorded
    assert [(r["from_step"], r["to_step"]) for r in read_history(tmp_path / "a" / "step-6")["runs"]] == [(0, 6)]


def test_schedule_warms_up_and_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[4] == max(lrs) and lrs[-1] == pytest.approx(0.1, abs=0.01)

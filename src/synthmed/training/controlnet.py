"""The ControlNet training loop on a frozen backbone (accelerate for devices, precision, state).

The backbone is frozen, so VAE latents and text embeddings are computed once: each training
image is encoded in all 8 flips/rotations (the conditioning mask gets the same transform,
exactly), and the text encoder runs once per distinct prompt. Batches and noise are pure
functions of (seed, step), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthmed.models.backbone import Backbone
from synthmed.training.common import DiffusionLoss, batch_indices, dihedral, drop_prompts, step_generator, to_model_range, warmup_cosine

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class ControlNetData:
    """Cached training tensors: latents (N, 8, C, h, w), conditioning (N, 8, 3, H, W) uint8, prompt table."""

    latents: torch.Tensor
    conditioning: torch.Tensor
    prompt_index: torch.Tensor
    prompt_table: torch.Tensor  # (P + 1, L, D); the last row is the empty prompt

    def __len__(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def cache_training_data(backbone: Backbone, images: np.ndarray, cond_images: np.ndarray, prompts: list[str], batch_size: int = 64) -> ControlNetData:
    """Encode every image in its 8 dihedral views once, and every distinct prompt once."""
    x = to_model_range(images)  # (N, 3, H, W)
    views = []
    for k in range(8):
        xk = dihedral(x, k)
        views.append(torch.cat([backbone.encode_images(xk[i : i + batch_size]) for i in range(0, len(xk), batch_size)]).cpu())
    cond = torch.from_numpy(cond_images).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    unique = sorted(set(prompts))
    table = backbone.encode_prompts(unique + [""]).cpu()
    return ControlNetData(
        latents=torch.stack(views, dim=1),
        conditioning=torch.stack([dihedral(cond, k) for k in range(8)], dim=1),
        prompt_index=torch.tensor([unique.index(p) for p in prompts]),
        prompt_table=table,
    )


def latest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint (step, path) in a folder, if any."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found) if found else None


def _save_checkpoint(accelerator, folder: Path, step: int, keep: int) -> None:
    """Save accelerate state atomically (temporary name, then rename) and keep the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp, final = folder / f".tmp-step-{step}", folder / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # a same-step state from an earlier attempt
        os.replace(tmp, final)
        steps = sorted(int(m.group(1)) for p in folder.glob("step-*") if (m := _STEP_DIR.match(p.name)))
        for old in steps[:-keep]:
            shutil.rmtree(folder / f"step-{old}", ignore_errors=True)
    accelerator.wait_for_everyone()


def train_controlnet(backbone: Backbone, controlnet, data: ControlNetData, cfg, accelerator, checkpoints: Path, resume: bool = False, progress=None, keep: int = 2) -> list[float]:
    """Train `controlnet` against the frozen backbone UNet; returns the per-step losses of this run.

    `cfg` has steps, batch_size (global), lr, prompt_dropout, checkpoint_every and seed
    (config.ControlNetConfig). Each process takes its slice of the global batch.
    """
    backbone.freeze()
    device = accelerator.device
    unet = backbone.unet.to(device)
    controlnet.train().requires_grad_(True)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    sched = warmup_cosine(opt, cfg.steps)
    controlnet, opt, sched = accelerator.prepare(controlnet, opt, sched)
    start = 0
    if resume and (found := latest_checkpoint(checkpoints)) is not None:
        start, path = found
        accelerator.load_state(str(path))
    loss_fn = DiffusionLoss(backbone.scheduler)
    empty = data.prompt_table[-1:].to(device)
    rank, world = accelerator.process_index, accelerator.num_processes
    losses = []
    for step in range(start, cfg.steps):
        g = step_generator(cfg.seed, step)
        idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
        views = torch.randint(0, 8, (cfg.batch_size,), generator=g)
        prompt_g = step_generator(cfg.seed, step, stream=2)
        emb_all = drop_prompts(data.prompt_table[data.prompt_index[idx]], empty.cpu(), cfg.prompt_dropout, prompt_g)
        mine = slice(rank, None, world)  # this process's share of the global batch
        latents = data.latents[idx[mine], views[mine]].to(device)  # (b, C, h, w)
        cond = data.conditioning[idx[mine], views[mine]].to(device).float().div(255.0)  # (b, 3, H, W)
        emb = emb_all[mine].to(device)
        noise_g = step_generator(cfg.seed, step, stream=3 + rank)

        def predict(noisy, t):
            down, mid = controlnet(noisy, t, emb, controlnet_cond=cond, return_dict=False)
            return unet(noisy, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

        with accelerator.autocast():
            loss = loss_fn(predict, latents, noise_g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}; last good checkpoint kept in {checkpoints}")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:  # the final state too, to train on later
            _save_checkpoint(accelerator, Path(checkpoints), done, keep)
        if progress:  # after the save, so an interrupt raised here keeps this step's checkpoint
            progress(done, cfg.steps, losses[-1])
    accelerator.wait_for_everyone()
    return losses


def unwrap_for_saving(accelerator, controlnet):
    """The plain ControlNetModel behind accelerate's wrappers, in eval mode."""
    return accelerator.unwrap_model(controlnet).eval()


"""The training loop: a ControlNet (and optionally UNet LoRA / decoder) against a frozen backbone.

Batches, augmentation, prompt dropout, noise and timesteps are pure functions of
(seed, step) for the global batch: each of N processes takes its slice of it, so 1 or N
processes train the same model, and a resumed run continues exactly where it stopped.
Checkpoints (accelerate state: trainable weights, optimiser, schedule, EMA, RNG) are written
under a temporary name, renamed when complete, and rotated.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch

from synthmed.models.backbone import Backbone
from synthmed.models.controlnet import ControlledUNet
from synthmed.training.batches import TrainingData
from synthmed.training.common import batch_indices, DiffusionLoss, drop_prompts, latent_weights, step_generator, warmup_cosine

_STEP_DIR = re.compile(r"^step-(\d+)$")


HISTORY = "history.json"


def read_history(checkpoint: Path | None) -> dict:
    """The loss per step and the invocations (from_step, to_step, seconds) recorded with a checkpoint."""
    from synthmed.core.io import read_json

    path = None if checkpoint is None else Path(checkpoint) / HISTORY
    return read_json(path) if path is not None and path.is_file() else {"losses": [], "runs": []}


def latest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint (step, path) in a folder, if any."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found) if found else None


def _save_checkpoint(accelerator, folder: Path, step: int, keep: int, history: dict) -> None:
    """Save accelerate state atomically (temporary name, then rename) and keep the newest `keep`.

    `history` (HISTORY in the folder) holds every step's loss so far and each invocation's steps and seconds,
    so that a resumed training's record covers the whole run."""
    from synthmed.core.io import write_json

    folder.mkdir(parents=True, exist_ok=True)
    tmp, final = folder / f".tmp-step-{step}", folder / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / HISTORY, history)
        shutil.rmtree(final, ignore_errors=True)  # a same-step state from an earlier attempt
        os.replace(tmp, final)
        steps = sorted(int(m.group(1)) for p in folder.glob("step-*") if (m := _STEP_DIR.match(p.name)))
        for old in steps[:-keep]:
            shutil.rmtree(folder / f"step-{old}", ignore_errors=True)
    accelerator.wait_for_everyone()


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key  # DDP's prefix


def checkpoint_hooks(accelerator, model, ema=None) -> None:
    """Checkpoints hold the trainable weights only (not the frozen backbone), loaded strictly, and
    the EMA as safetensors: nothing in a checkpoint folder is unpickled beyond accelerate's own."""
    from safetensors.torch import load_file, save_file

    from synthmed.core.io import read_json, write_json

    inner = accelerator.unwrap_model(model)
    names = inner.trainable_names()

    def save_hook(models, weights, output_dir):
        for i, m in enumerate(models):
            if accelerator.unwrap_model(m) is inner:
                weights[i] = {k: v.contiguous() for k, v in weights[i].items() if _strip(k) in names}  # channels_last too
        if ema is not None and accelerator.is_main_process:
            state = ema.state_dict()
            save_file({str(i): p.detach().contiguous().cpu() for i, p in enumerate(state.pop("shadow_params"))}, Path(output_dir) / "ema.safetensors")
            write_json(Path(output_dir) / "ema.json", state)

    def load_hook(models, input_dir):
        for i, m in enumerate(list(models)):
            if accelerator.unwrap_model(m) is inner:
                models.remove(m)
                state = {_strip(k): v for k, v in load_file(Path(input_dir) / f"model{'_' + str(i) if i else ''}.safetensors").items()}
                if set(state) != names:
                    raise ValueError(f"{input_dir}: checkpoint weights do not match the model's trainable parts "
                                     f"({len(set(state) - names)} unexpected, {len(names - set(state))} missing); same settings as the interrupted run?")
                inner.load_state_dict(state, strict=False)
        if ema is not None:
            shadow = load_file(Path(input_dir) / "ema.safetensors")
            ema.load_state_dict(read_json(Path(input_dir) / "ema.json") | {"shadow_params": [shadow[str(i)] for i in range(len(shadow))]})

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def param_groups(model: ControlledUNet, lrs: dict[str, float]) -> list[dict]:
    """Optimiser groups: ControlNet, UNet LoRA, unlocked UNet weights, each at its own rate."""
    parts = {"controlnet": [], "lora": [], "unet": []}
    if model.controlnet is not None:
        parts["controlnet"] = [p for p in model.controlnet.parameters() if p.requires_grad]
    for name, p in model.unet.named_parameters():
        if p.requires_grad:
            parts["lora" if "lora_" in name else "unet"].append(p)
    groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in parts.items() if ps]
    if not groups:
        raise ValueError("param_groups expects a model with trainable parameters, but got none")
    return groups


def make_optimizer(groups: list[dict], kind: str = "adamw", weight_decay: float = 1e-2):
    """AdamW, or bitsandbytes' 8-bit AdamW (its states take a quarter of the memory)."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer adamw8bit expects bitsandbytes to be installed (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if kind != "adamw":
        raise ValueError(f"make_optimizer expects adamw or adamw8bit, but got {kind!r}")
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def resume_point(checkpoints: Path, resume: bool | str | Path) -> tuple[int, Path] | None:
    """(step, folder) to resume from: the newest checkpoint for True/"latest", or a given step-N folder."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        return latest_checkpoint(checkpoints)
    path = Path(resume)
    m = _STEP_DIR.match(path.name)
    if not (m and path.is_dir()):
        raise ValueError(f"resume expects 'latest' or a checkpoint folder named step-N, but got {str(resume)!r}")
    return int(m.group(1)), path


def train(model: ControlledUNet, backbone: Backbone, data: TrainingData, cfg, accelerator, checkpoints: Path, resume: bool | str | Path = False,
          progress=None, class_weights: torch.Tensor | None = None, validate=None, lrs: dict[str, float] | None = None) -> list[float]:
    """Train the trainable parts of `model`; returns the per-step losses from step 0 (a resumed run's earlier
    steps come from the checkpoint's history; each invocation is recorded there too: `read_history`).

    `cfg` (config.ControlNetConfig) gives steps, batch_size (global), lr, prompt_dropout,
    conditioning_mode, grad_accum, min_snr_gamma, ema_decay, optimizer, checkpoint_every,
    keep_checkpoints, validation_every and seed. `class_weights` (K + 1,) weight the loss per
    mask class on the latent grid; `validate(model, step)` runs on the main process.
    """
    accum, world = cfg.grad_accum, accelerator.num_processes
    if cfg.batch_size % (accum * world):
        raise ValueError(f"train expects batch_size divisible by grad_accum x processes ({accum} x {world}), but got {cfg.batch_size}")
    opt = make_optimizer(param_groups(model, lrs or {"controlnet": cfg.lr, "lora": cfg.lr, "unet": cfg.lr}), cfg.optimizer)
    sched = warmup_cosine(opt, cfg.steps)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    ema = _ema(accelerator.unwrap_model(model), cfg.ema_decay)
    checkpoint_hooks(accelerator, model, ema)
    start, earlier = 0, read_history(None)
    if (found := resume_point(checkpoints, resume)) is not None:
        start, path = found
        accelerator.load_state(str(path))
        earlier = read_history(path)
    step_fn = _Step(model, backbone, data, cfg, accelerator, class_weights)
    losses, began = list(earlier["losses"][:start]), time.time()
    for step in range(start, cfg.steps):
        try:
            losses.append(step_fn(step))
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc}; last good checkpoint kept in {checkpoints}") from None
        accelerator.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(_trainable(accelerator.unwrap_model(model)))
        done = step + 1
        accelerator.log({"loss": losses[-1], "lr": sched.get_last_lr()[0]}, step=done)  # to the trackers (none: a no-op)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:  # the final state too, to train on later
            run = {"from_step": start, "to_step": done, "seconds": round(time.time() - began, 1)}
            _save_checkpoint(accelerator, Path(checkpoints), done, cfg.keep_checkpoints, {"losses": losses, "runs": earlier["runs"] + [run]})
        every = cfg.validation_every
        if validate is not None and every and (done % every == 0 or done == cfg.steps) and accelerator.is_main_process:
            validate(accelerator.unwrap_model(model), done)
        if progress:  # after the save, so an interrupt raised here keeps this step's checkpoint
            progress(done, cfg.steps, losses[-1])
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(_trainable(accelerator.unwrap_model(model)))  # the saved model is the EMA
    return losses


class _Step:
    """One optimiser step's forward/backward over the global batch (this process's share of it)."""

    def __init__(self, model, backbone: Backbone, data: TrainingData, cfg, accelerator, class_weights):
        self.model, self.backbone, self.data, self.cfg, self.acc = model, backbone, data, cfg, accelerator
        self.class_weights = class_weights
        self.loss_fn = DiffusionLoss(backbone.scheduler, min_snr_gamma=cfg.min_snr_gamma)
        self.empty_row = torch.tensor([len(data.prompts)])
        self.empty = data.embeddings(backbone, self.empty_row)
        self.factor = backbone.vae_scale_factor
        self.latent_shape = (backbone.unet.config.in_channels, data.size[0] // self.factor, data.size[1] // self.factor)

    def __call__(self, step: int) -> float:
        cfg, data, acc = self.cfg, self.data, self.acc
        b, accum = cfg.batch_size, cfg.grad_accum
        idx = batch_indices(len(data), b, step, cfg.seed)
        aug = data.draw(b, step_generator(cfg.seed, step))
        rows = self.empty_row.expand(b) if cfg.conditioning_mode == "mask" else data.prompt_index[idx]
        emb_all = drop_prompts(data.embeddings(self.backbone, rows), self.empty, cfg.prompt_dropout, step_generator(cfg.seed, step, stream=2))
        noise_all, t_all = self.loss_fn.draw((b, *self.latent_shape), step_generator(cfg.seed, step, stream=3))
        micro, total = b // accum, 0.0
        for j in range(accum):
            mine = torch.arange(j * micro, (j + 1) * micro)[acc.process_index :: acc.num_processes]  # this process's share
            latents, cond, masks = data.batch(self.backbone, idx[mine], aug.take(mine))
            weights = None if self.class_weights is None else latent_weights(masks, self.class_weights, self.factor)
            emb = emb_all[mine].to(acc.device)
            cond = None if cond is None else cond.to(acc.device)

            def predict(noisy, t):
                return self.model(noisy, t, emb, cond)

            with acc.autocast():
                loss = self.loss_fn(predict, latents.to(acc.device), noise=noise_all[mine], timesteps=t_all[mine], pixel_weights=weights) / accum
            self._check_finite(loss, step)
            if j < accum - 1:
                with acc.no_sync(self.model):
                    acc.backward(loss)
            else:
                acc.backward(loss)
            total += float(loss.detach())
        return float(acc.reduce(torch.tensor(total, device=acc.device), reduction="mean"))

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Stop every process together when any of them sees a NaN/inf loss."""
        bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=self.acc.device)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, reduction="sum")
        if bad > 0:
            raise FloatingPointError(f"loss is {float(loss.detach())} at step {step + 1}")


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _ema(model, decay: float):
    """An EMA of the trainable weights, or None (diffusers' EMAModel: decay warms up from 0)."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(_trainable(model), decay=decay)

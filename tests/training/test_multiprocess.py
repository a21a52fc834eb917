"""`accelerate launch` with 2 CPU processes (gloo) trains the same ControlNet as one plain process.

Each process takes its slice of a global batch that is a pure function of (seed, step), so the
only difference between 1 and 2 processes should be float rounding: the order in which the
per-sample gradients are summed (one backward over 4 samples, versus two backwards over 2 and
a gloo all-reduce averaging them).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthmed.core.io import read_json
from synthmed.testing.cli import run_cli

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

STEPS, BATCH, LR = 4, 4, 5e-4
# Per weight: Adam divides each gradient by its own running RMS, so an element whose gradient is
# near zero (at the level of the summation-order rounding) can move by a good part of lr in one
# run and not in the other. The ControlNet's encoder gets its first gradient at step 2 (the zero
# convolutions shield it at step 1), which is exactly that case. Measured: at most ~4e-5 between
# 1 and 2 processes (and ~5e-5 between one process on 1 vs 2 threads); a schedule or batch-split
# mismatch moves nearly every weight by ~lr (5e-4).
ATOL = 2e-4
# Over all weights: the 1-vs-2 difference is ~2e-4 of how far training moved the weights (~0.1 when
# the learning-rate schedule runs at a different pace).
RTOL_NORM = 2e-3
# An accelerate config of our own, so a user's default config (~/.cache/huggingface/accelerate)
# cannot change the launch. `--multi_gpu` selects torchrun; ACCELERATE_USE_CPU=1 then makes
# accelerate use MULTI_CPU/gloo. (`--cpu --num_processes 2` without mpirun runs ONE process.)
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
mixed_precision: 'no'
gpu_ids: all
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data, out, backbone, batch_size: int = BATCH) -> list[str]:
    return ["train", "controlnet", "--data", str(data), "--out", str(out), "--backbone", str(backbone), "--steps", str(STEPS),
            "--batch-size", str(batch_size), "--lr", str(LR), "--seed", "0", "--set", "checkpoint_every=2", "--set", "log_with=null",
            "--set", "prompt_dropout=0.3"]


def _launch_two(args: list[str], tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` (the venv's) of `synthmed ARGS` on 2 CPU processes."""
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(_free_port()), "-m", "synthmed.cli", *args]
    env = dict(os.environ, SYNTHMED_NO_PROGRESS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")
    return subprocess.run(launch, env=env, capture_output=True, text=True, timeout=timeout)


def _untrained_controlnet(backbone_dir, data) -> dict[str, torch.Tensor]:
    """The ControlNet `train controlnet` starts from (same seed, same conditioning channels)."""
    from synthmed.data.prepared import load_conditioning, load_split
    from synthmed.models.backbone import load_backbone
    from synthmed.models.controlnet import build_controlnet

    channels = load_conditioning(load_split(data, "train")).shape[-1]
    backbone = load_backbone(backbone_dir).freeze()
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in build_controlnet(backbone.unet, backbone.vae_scale_factor, channels).state_dict().items()}


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[k].flatten().float() for k in sorted(weights)])


def test_two_processes_train_the_same_controlnet_as_one(tiny_backbone_dir, phantom_data, tmp_path):
    one, two, cache = tmp_path / "one", tmp_path / "two", tmp_path / "latent-cache"
    double = _launch_two(_train_args(phantom_data, two, tiny_backbone_dir) + ["--set", f"latent_cache={cache}"], tmp_path)
    assert double.returncode == 0, double.stderr[-5000:]
    single = run_cli(*_train_args(phantom_data, one, tiny_backbone_dir), "--set", f"latent_cache={cache}")
    assert single.returncode == 0, single.stderr[-3000:]

    # The latent cache: each image encoded once in total by the 2 processes (each a share), then reused.
    built, reused = read_json(two / "training.json")["latent_cache"], read_json(one / "training.json")["latent_cache"]
    meta = read_json(Path(built["path"]) / "meta.json")
    n, views = meta["shape"][:2]
    chunks = views * -(-n // 32)  # one view of up to 32 consecutive images per chunk
    assert not built["reused"] and sorted(meta["chunks_done_by"]) == ["done-0", "done-1"]
    assert sum(meta["chunks_done_by"].values()) == chunks and min(meta["chunks_done_by"].values()) >= chunks // 2
    assert reused["reused"] and reused["encoded_here"] == 0 and reused["path"] == built["path"]

    for out, processes in ((one, 1), (two, 2)):
        assert (out / "controlnet" / "config.json").is_file()
        record = read_json(out / "training.json")
        assert record["processes"] == processes and record["steps"] == STEPS and len(record["last_losses"]) == STEPS
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    a = load_file(one / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(two / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert set(a) == set(b)
    worst = max(a, key=lambda k: float((a[k] - b[k]).abs().max()))
    assert torch.allclose(a[worst], b[worst], rtol=0, atol=ATOL), f"{worst}: 1 vs 2 processes differ by {float((a[worst] - b[worst]).abs().max()):.3g}"

    # Not vacuous: training moved the weights far more than 1 and 2 processes disagree.
    init = _untrained_controlnet(tiny_backbone_dir, phantom_data)
    assert set(init) == set(b)
    moved = _flat(b) - _flat(init)
    assert float(moved.abs().max()) > 5 * ATOL and float((moved.abs() > 1e-5).float().mean()) > 0.5
    assert not torch.equal(b["controlnet_mid_block.weight"], init["controlnet_mid_block.weight"])  # zero-initialised, now trained
    assert float((_flat(a) - _flat(b)).norm()) < RTOL_NORM * float(moved.norm())
    losses_1, losses_2 = read_json(one / "training.json")["last_losses"], read_json(two / "training.json")["last_losses"]
    assert losses_1 == pytest.approx(losses_2, abs=1e-5)  # the per-step losses, reduced over processes


def test_global_batch_not_divisible_by_the_processes_is_refused(tiny_backbone_dir, phantom_data, tmp_path):
    out = tmp_path / "odd"
    proc = _launch_two(_train_args(phantom_data, out, tiny_backbone_dir, batch_size=3), tmp_path)
    assert proc.returncode != 0
    # Every process stops with the CLI's one-line error (exit code 2), not a traceback of its own;
    # the launcher (torchrun) then reports the failed worker and exits non-zero itself.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("divisible" in line and "got 3" in line for line in errors), proc.stderr[-3000:]
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-3000:]
    assert not (out / "controlnet").exists() and not (out / "checkpoints").exists()

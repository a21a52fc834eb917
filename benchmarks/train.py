"""Benchmark ControlNet training: img/s and peak memory per variant, in one run, as ratios.

    python benchmarks/train.py                                   # tiny preset, shipped weights, 64 px, CPU
    python benchmarks/train.py --variants cached uncached compile channels_last
    python benchmarks/train.py --backbone sd15 --resolution 512 --batch-size 8 --mixed-precision bf16   # on a GPU

Every variant runs in a fresh interpreter on the same phantom images, so its peak memory is
its own (CUDA: torch.cuda.max_memory_allocated; CPU: the process's VmHWM). Training img/s
counts optimiser steps x global batch after `--warmup` steps; the one-off latent cache is
timed separately and also folded into an "incl. cache" figure. Ratios are against the
first variant. Only compare figures from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
# dense bf16/fp16 tensor-core peaks (TFLOP/s) by device name, for the model FLOP utilisation
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "V100": 125.0, "T4": 65.0}
import json, sys, tempfile, time
import numpy as np, torch
from accelerate import Accelerator
a = json.loads(sys.argv[1]); variant = sys.argv[2]
from synthmed.config import ControlNetConfig
from synthmed.data.conditioning import colour_mask
from synthmed.data.phantoms.histology import phantom_samples
from synthmed.training.setup import build_model, cast_frozen
from synthmed.models.backbone import build_backbone, load_backbone
from synthmed.models.controlnet import build_controlnet
from synthmed.training.batches import build_training_data
from synthmed.training.controlnet import train
torch.manual_seed(0)
bb = load_backbone(a["backbone"]) if a["weights"] == "shipped" else build_backbone(a["backbone"], seed=0, sample_size=a["resolution"] // 8)
acc = Accelerator(mixed_precision=a["mixed_precision"])
bb.freeze().to(acc.device)
size = a["resolution"]
tiles = [s for s, _ in zip(phantom_samples(0, min(size, 256), n_slides=max(3, a["n_images"] // 12 + 1), tiles_per_slide=12, n_unlabelled_slides=0), range(a["n_images"]))]
def up(x):  # phantom tiles exist up to 256 px; larger resolutions repeat pixels (the content does not matter here)
    r = size // x.shape[0]
    return np.kron(x, np.ones((r, r) + (1,) * (x.ndim - 2), dtype=x.dtype)) if r > 1 else x
images = np.stack([up(t.image) for t in tiles]); masks = np.stack([up(t.mask) for t in tiles])
cond = np.stack([colour_mask(m) for m in masks]); prompts = [t.prompt for t in tiles]
cfg = ControlNetConfig(steps=a["warmup"] + a["steps"], batch_size=a["batch_size"], lr=1e-5, prompt_dropout=0.1, checkpoint_every=10**9, seed=0,
                       gradient_checkpointing=a["gradient_checkpointing"], mixed_precision=a["mixed_precision"], log_with=None,
                       compile=variant == "compile", channels_last=variant == "channels_last")
controlnet = build_controlnet(bb.unet, bb.vae_scale_factor)
cast_frozen(bb, a["mixed_precision"], acc.device)
t0 = time.perf_counter()
data = build_training_data(bb, images, cond, prompts, masks=masks, cache=variant != "uncached")
cache_s = time.perf_counter() - t0
model = build_model(bb, controlnet, cfg)
marks = []
def progress(done, total, loss):
    if acc.device.type == "cuda": torch.cuda.synchronize()
    marks.append(time.perf_counter())
with tempfile.TemporaryDirectory() as tmp:
    train(model, bb, data, cfg, acc, tmp, progress=progress)
secs = marks[-1] - marks[a["warmup"] - 1]
img_s = a["steps"] * a["batch_size"] / secs
if acc.device.type == "cuda":
    peak = torch.cuda.max_memory_allocated() / 2**20
else:
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
row = {"img_s": img_s, "train_s": secs, "cache_s": cache_s, "peak_mb": peak, "device": str(acc.device),
       "img_s_incl_cache": a["steps"] * a["batch_size"] / (secs + cache_s)}
if a["flops"]:  # one more optimiser step under PyTorch's FLOP counter: forward + backward of the trained model
    from torch.utils.flop_counter import FlopCounterMode
    with tempfile.TemporaryDirectory() as tmp, FlopCounterMode(display=False) as counter:
        train(model, bb, data, cfg.model_copy(update={"steps": 1}), acc, tmp)
    per_step = counter.get_total_flops()
    achieved = per_step * a["steps"] / secs
    name = torch.cuda.get_device_name() if acc.device.type == "cuda" else "cpu"
    peak_tflops = a["peak_tflops"] or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    row |= {"flops_per_step": per_step, "tflops": achieved / 1e12, "peak_tflops": peak_tflops,
            "mfu": None if not peak_tflops else achieved / (peak_tflops * 1e12)}
print(json.dumps(row))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tiny", help="preset name or backbone folder")
    ap.add_argument("--weights", choices=("shipped", "random"), default="shipped", help="random: the preset's architecture with random weights")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--n-images", type=int, default=96)
    ap.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--variants", nargs="*", default=["cached", "uncached"], help="cached, uncached, compile, channels_last")
    ap.add_argument("--flops", action="store_true", help="also count one step's FLOPs (torch.utils.flop_counter): TFLOP/s and model FLOP utilisation")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for --flops (default: by GPU name, e.g. H100 989)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    spec = {k: getattr(args, k) for k in ("backbone", "weights", "resolution", "batch_size", "steps", "warmup", "n_images", "mixed_precision",
                                          "gradient_checkpointing", "flops", "peak_tflops")}
    rows = []
    print(f"{'variant':<14} {'img/s':>8} {'ratio':>6} {'img/s incl. cache':>18} {'cache s':>8} {'peak MB':>9}")
    for v in args.variants:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec), v], capture_output=True, text=True, env=dict(os.environ, SYNTHMED_NO_PROGRESS="1"))
        if proc.returncode:
            print(f"{v:<14} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1]) | {"variant": v}
        rows.append(r)
        ratio = r["img_s"] / rows[0]["img_s"]
        print(f"{v:<14} {r['img_s']:>8.1f} {ratio:>6.2f} {r['img_s_incl_cache']:>18.1f} {r['cache_s']:>8.1f} {r['peak_mb']:>9.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"spec": spec, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()

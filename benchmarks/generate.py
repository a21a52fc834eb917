"""Benchmark generation: synthmed's sampler against a plain diffusers pipeline loop, in one run.

    python benchmarks/generate.py                                  # tiny preset, shipped weights, 64 px, CPU
    python benchmarks/generate.py --variants synthmed synthmed_channels_last synthmed_bf16
    python benchmarks/generate.py --backbone sd15 --weights random --resolution 512 --batch-size 8 --precision fp16   # on a GPU
    python benchmarks/generate.py --quality-data DEMO/data --quality-model DEMO/controlnet --quality-steps 5 10 25

The baseline is what a user would write: one `StableDiffusionControlNetPipeline` call per batch
with the same model, scheduler, steps, guidance, batch size and per-sample generators. Every
variant draws the same images (same conditioning, prompts and seeds); repeats are interleaved
(A B A B ...) so that machine noise hits every variant alike, and img/s is the median over
repeats after one warm-up pass. Ratios are against the pipeline. `max_abs_diff` is the largest
pixel difference (0..255) from the pipeline's images: 0 or 1 for fp32 variants (the same
computation; padding changes the last bits of some rows), larger for bf16/fp16.

The quality trade (--quality-*) draws the first N training layouts of a prepared data set with a
trained model at each step count, and scores them with a segmenter trained on the real train
split (Dice against the conditioning mask), so fewer steps can be weighed against plausibility.
Only compare figures from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _setup(a):
    import numpy as np
    import torch

    from synthmed.data.conditioning import colour_mask
    from synthmed.data.phantoms.histology import phantom_samples
    from synthmed.models.backbone import build_backbone, load_backbone
    from synthmed.models.controlnet import build_controlnet, load_controlnet

    size = a.resolution
    bb = load_backbone(a.backbone) if a.weights == "shipped" else build_backbone(a.backbone, seed=0, sample_size=size // 8)
    if a.controlnet:
        cn = load_controlnet(a.controlnet)
    else:
        torch.manual_seed(0)
        cn = build_controlnet(bb.unet, bb.vae_scale_factor)
        with torch.no_grad():  # a trained ControlNet's zero convolutions are not zero
            for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
                conv.weight.normal_(0, 0.05)
    tiles = [t for t, _ in zip(phantom_samples(0, min(size, 256), n_slides=max(3, a.n_images // 12 + 1), tiles_per_slide=12, n_unlabelled_slides=0), range(a.n_images))]
    r = max(1, size // tiles[0].mask.shape[0])
    cond = np.stack([colour_mask(np.kron(t.mask, np.ones((r, r), dtype=t.mask.dtype))) for t in tiles])  # (N, H, W, 3)
    return bb, cn, cond, [t.prompt for t in tiles]


def _runner(variant: str, bb, cn, settings, device: str, precision: str):
    """A function (cond, prompts, seeds) -> images for one variant."""
    import torch

    from synthmed.generation.sample import Sampler
    from synthmed.models.sampling import controlnet_pipeline, sample_images

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes["bf16" if variant.endswith("_bf16") else "fp16" if variant.endswith("_fp16") else precision]
    if variant == "pipeline":
        for m in (bb.unet, bb.vae, bb.text_encoder, cn):
            m.to(device, dtype)
        pipe = controlnet_pipeline(bb, cn, settings.scheduler).to(device)
        return lambda c, p, s: sample_images(pipe, c, p, s, settings)
    sampler = Sampler(bb, cn, settings, device=device, dtype=dtype, channels_last="contiguous" not in variant)
    return sampler


def _reset(bb, cn):
    import torch

    for m in (bb.unet, bb.vae, cn):
        m.to(torch.float32).to(memory_format=torch.contiguous_format)
    bb.text_encoder.to(torch.float32)


def _pass(run, cond, prompts, batch: int, sync) -> tuple[float, list]:
    out, t0 = [], time.perf_counter()
    for i in range(0, len(cond), batch):
        out.append(run(cond[i : i + batch], prompts[i : i + batch], list(range(i, min(i + batch, len(cond))))))
        sync()
    return time.perf_counter() - t0, out


def speed(a) -> list[dict]:
    import numpy as np
    import torch

    from synthmed.models.sampling import SamplingSettings

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bb, cn, cond, prompts = _setup(a)
    bb.freeze()
    settings = SamplingSettings(a.scheduler, a.steps, a.guidance_scale, 1.0)
    variants = ["pipeline", *[v for v in a.variants if v != "pipeline"]]
    times = {v: [] for v in variants}
    images = {}
    for rep in range(a.repeats + 1):  # the first pass warms up every variant
        for v in variants:
            _reset(bb, cn)
            run = _runner(v, bb, cn, settings, device, a.precision)
            seconds, out = _pass(run, cond, prompts, a.batch_size, sync)
            if rep:
                times[v].append(seconds)
            images[v] = np.concatenate(out)
            print(f"  {v}: pass {rep} {len(cond) / seconds:.2f} img/s" + (" (warm-up)" if rep == 0 else ""), flush=True)
    base = statistics.median(times["pipeline"])
    rows = []
    for v in variants:
        t = statistics.median(times[v])
        rows.append({"variant": v, "img_s": len(cond) / t, "ratio": base / t, "seconds": times[v],
                     "max_abs_diff": int(np.abs(images[v].astype(int) - images["pipeline"]).max())})
    return rows


def quality(a) -> list[dict]:
    """Mean plausibility Dice and img/s at each step count, on a trained model's training layouts."""
    from pathlib import Path

    import numpy as np
    import torch

    from synthmed.data.prepared import load_conditioning, load_split, read_card
    from synthmed.evaluation.metrics import dice_per_image
    from synthmed.models.tasknets import predict
    from synthmed.training.tasks import train_segmenter
    from synthmed.data.prompts import trained_prompts
    from synthmed.models.trained import trained_backbone
    from synthmed.generation.sample import Sampler
    from synthmed.models.sampling import SamplingSettings
    from synthmed.core.io import read_json
    from synthmed.models.backbone import load_backbone
    from synthmed.models.controlnet import load_controlnet

    data, model = Path(a.quality_data), Path(a.quality_model)
    training = read_json(model / "training.json")
    classes = read_card(data)["classes"]
    split = load_split(data, "train", need_masks=True)
    n = min(a.quality_n, len(split))
    cond, masks = load_conditioning(split)[:n], split.masks[:n]
    prompts = trained_prompts(split, training.get("conditioning_mode", "both"), training.get("prompt_source", "text"), training.get("label_prompt", "{label}"))[:n]
    print(f"  training the judge segmenter ({a.segmenter_steps} steps) ...", flush=True)
    seg = train_segmenter(split.images, split.masks, len(classes), a.segmenter_steps, 16, 2e-3, 0)
    bb = trained_backbone(load_backbone(training["backbone"]), model, training).freeze()
    cn = load_controlnet(model / "controlnet")
    rows = []
    for steps in a.quality_steps:
        sampler = Sampler(bb, cn, SamplingSettings(a.scheduler, steps, a.guidance_scale, a.conditioning_scale))
        t0 = time.perf_counter()
        images = np.concatenate([sampler(cond[i : i + a.batch_size], prompts[i : i + a.batch_size], list(range(i, min(i + a.batch_size, n)))) for i in range(0, n, a.batch_size)])
        seconds = time.perf_counter() - t0
        dice = dice_per_image(predict(seg, images), masks, len(classes))
        rows.append({"steps": steps, "img_s": n / seconds, "dice_mean": float(dice.mean()), "dice_std": float(dice.std()), "n": n})
        print(f"  {steps} steps: {n / seconds:.2f} img/s, plausibility Dice {dice.mean():.3f} ± {dice.std():.3f} (n={n})", flush=True)
    torch.set_grad_enabled(True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tiny", help="preset name or backbone folder")
    ap.add_argument("--weights", choices=("shipped", "random"), default="shipped", help="random: the preset's architecture with random weights")
    ap.add_argument("--controlnet", default=None, help="a trained ControlNet folder (default: random weights)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-images", type=int, default=32, help="images per timed pass")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scheduler", default="unipc", choices=("ddim", "unipc", "dpm", "euler"))
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--conditioning-scale", type=float, default=1.5)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="of the pipeline and the plain synthmed variants")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--variants", nargs="*", default=["synthmed", "synthmed_contiguous"],
                    help="synthmed (channels-last, the default), synthmed_contiguous, synthmed_bf16, synthmed_fp16 (the pipeline always runs)")
    ap.add_argument("--quality-data", default=None, help="prepared data set (its train split) for the steps vs plausibility trade")
    ap.add_argument("--quality-model", default=None, help="trained model folder (`synthmed train controlnet --out`)")
    ap.add_argument("--quality-steps", type=int, nargs="*", default=[5, 10, 25])
    ap.add_argument("--quality-n", type=int, default=64)
    ap.add_argument("--segmenter-steps", type=int, default=1200)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the variants cast models back and forth; diffusers warns on every cast
    print(f"generation: {a.backbone} ({a.weights}), {a.resolution} px, batch {a.batch_size}, {a.steps} steps {a.scheduler}, "
          f"guidance {a.guidance_scale}, {a.precision}, {torch.get_num_threads()} threads", flush=True)
    rows = speed(a)
    print(f"\n{'variant':<26}{'img/s':>8}{'x pipeline':>12}{'max |diff|':>12}")
    for r in rows:
        print(f"{r['variant']:<26}{r['img_s']:>8.2f}{r['ratio']:>12.2f}{r['max_abs_diff']:>12}")
    result = {"settings": vars(a), "rows": rows, "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if a.quality_data and a.quality_model:
        result["quality"] = quality(a)
        print(f"\n{'steps':>6}{'img/s':>8}{'Dice':>8}")
        for r in result["quality"]:
            print(f"{r['steps']:>6}{r['img_s']:>8.2f}{r['dice_mean']:>8.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()

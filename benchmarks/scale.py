"""Every stage at the users' data sizes on one machine: time and peak resident memory, each in a fresh process.

    python benchmarks/scale.py                                  # 16,000 images at 512 px (hours on a CPU)
    python benchmarks/scale.py --n 2000 --size 256 --views 1    # a size a CPU session can afford
    python benchmarks/scale.py --n 24 --size 64                 # a smoke run

First it writes a source data set of N images of SIZE x SIZE with class masks (phantom histology tiles,
upscaled by pixel repetition above 256 px: the content does not matter here) with a manifest.csv,
then runs the real commands on it, each in its own interpreter, timed from outside with its
peak resident set (ru_maxrss from wait4):

    prepare     synthmed prepare manifest (PNG images, masks and a manifest.csv -> the prepared layout)
    train       synthmed train controlnet, a few steps, the latent cache built (--views per image)
    generate    synthmed generate, a few samples, the dice filter (its judge trained on the train split)
    evaluate    synthmed evaluate: FID/KID over the whole train split, plausibility, memorisation
    downstream  synthmed evaluate downstream: one cell (real arm, fraction 1, one seed, a few steps)

Every stage runs with its splits on disk (SYNTHMED_LAZY_BYTES=1, as a 16,000-image split is at any size) and
SYNTHMED_ROWS_ONLY=1: a stage that reads a split whole fails instead of passing on a small N, so a peak measured
at a small N is the peak at a large one, up to what grows per image (metadata rows, features, indices).
The decoded splits and the latent cache live under the work folder (SYNTHMED_CACHE=WORK/cache).

Prints a table (seconds, peak RSS, whether under --budget-gb) and writes --json. Only compare figures
from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("prepare", "train", "generate", "evaluate", "downstream")
OUTPUTS = {"prepare": ("data",), "train": ("run", "latent-cache"), "generate": ("synthetic",), "evaluate": ("evaluation",), "downstream": ("study",)}


def write_source(root: Path, n: int, size: int, seed: int = 0) -> None:
    """N phantom tiles with their class masks and tissue labels: root/images/*.png, root/masks/*.png and
    root/manifest.csv (image, mask, label, patient_id: 4 tiles a patient), a `manifest` source."""
    import csv

    import numpy as np
    from PIL import Image

    from synthmed.data.phantoms.histology import phantom_samples

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    base = min(size, 256)
    reps = max(1, size // base)
    tiles = phantom_samples(seed, base, n_slides=n // 4 + 1, tiles_per_slide=4, n_unlabelled_slides=0)  # a patient = a slide
    rows = []
    for i, tile in zip(range(n), tiles):
        image, mask = tile.image, tile.mask
        if reps > 1:
            image = np.kron(image, np.ones((reps, reps, 1), np.uint8))
            mask = np.kron(mask, np.ones((reps, reps), np.uint8))
        name = f"P{i // 4:05d}_{i:06d}.png"
        Image.fromarray(image).save(root / "images" / name, compress_level=1)
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / name, compress_level=1)
        rows.append({"image": f"images/{name}", "mask": f"masks/{name}", "label": tile.label, "patient_id": f"P{i // 4:05d}"})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def commands(work: Path, a) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "synthmed.cli"]
    data, run, syn = work / "data", work / "run", work / "synthetic"
    return {
        "prepare": cli + ["prepare", "manifest", "--root", str(work / "source"), "--out", str(data), "--workers", str(a.workers),
                          "-o", "classes=neoplastic,inflammatory,connective,dead,epithelial", "--conditioning", "colour"],
        "train": cli + ["train", "controlnet", "--data", str(data), "--out", str(run), "--steps", str(a.train_steps), "--batch-size", "4",
                        "-s", f"augment.views={a.views}", "-s", f"latent_cache={work / 'latent-cache'}", "-s", "log_with=null"],
        "generate": cli + ["generate", "--data", str(data), "--model", str(run), "--out", str(syn), "--n", "4", "--steps", "2", "--batch-size", "4",
                           "--filter", "dice", "-s", "filter.min_dice=0", "-s", "filter.segmenter.steps=20"],
        "evaluate": cli + ["evaluate", "--data", str(data), "--synthetic", str(syn), "--out", str(work / "evaluation"),
                           "-s", "segmenter.steps=20", "-s", "domain.steps=20", "-s", "paired_regeneration=0", "-s", "n_boot=20"],
        "downstream": cli + ["evaluate", "downstream", "--data", str(data), "--out", str(work / "study"), "-s", "arms=[real]",
                             "-s", "fractions=[1.0]", "-s", "seeds=[0]", "-s", "training.steps=20", "-s", "eval_every=10"],
    }


def measure(cmd: list[str], log: Path) -> dict:
    """Run one stage; seconds from outside and its peak resident set (Linux's wait4 reports the larger of the
    process's own and that of the children it waited for, e.g. prepare's workers)."""
    started = time.perf_counter()
    with open(log, "w") as fh:
        env = dict(os.environ, SYNTHMED_NO_PROGRESS="1", SYNTHMED_LAZY_BYTES="1", SYNTHMED_ROWS_ONLY="1", SYNTHMED_CACHE=str(log.parent / "cache"))
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3), "exit": os.waitstatus_to_exitcode(status)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16000, help="images in the source data set")
    ap.add_argument("--size", type=int, default=512, help="their size in pixels (square)")
    ap.add_argument("--views", type=int, default=8, help="dihedral views per image in the latent cache (augment.views)")
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="prepare's worker processes")
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    ap.add_argument("--budget-gb", type=float, default=3.0, help="the peak RSS each stage should stay under")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: scale-N-SIZE; kept, so a rerun skips the source)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(f"scale-{a.n}-{a.size}")
    if not (work / "source" / ".done").is_file():
        t = time.perf_counter()
        write_source(work / "source", a.n, a.size)
        (work / "source" / ".done").write_text("")
        print(f"source: {a.n} images at {a.size} px written in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    print(f"{'stage':<12}{'seconds':>10}{'peak RSS GB':>13}  under {a.budget_gb:g} GB", flush=True)
    for stage, cmd in commands(work, a).items():
        if stage not in a.stages:
            continue
        for name in OUTPUTS[stage]:  # a stage run again (--stages) starts from nothing of its own
            shutil.rmtree(work / name, ignore_errors=True)
        r = {"stage": stage, **measure(cmd, work / f"{stage}.log")}
        rows.append(r)
        ok = "failed: see " + str(work / f"{stage}.log") if r["exit"] else ("yes" if r["peak_rss_gb"] < a.budget_gb else "NO")
        print(f"{stage:<12}{r['seconds']:>10.1f}{r['peak_rss_gb']:>13.2f}  {ok}", flush=True)
        if r["exit"]:
            break
    if a.json:
        a.json.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "rows": rows}, indent=2))
    if any(r["exit"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

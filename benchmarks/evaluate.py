"""Benchmark evaluation on CPU (or GPU): images/s of each feature extractor and of each metric.

    python benchmarks/evaluate.py                      # 256 phantom images, 64 px
    python benchmarks/evaluate.py --n-images 1024 --resolution 128 --json bench.json

Feature extractors: the FID InceptionV3 (seeded random weights: the same architecture and cost
as the real file), the domain classifier's penultimate layer (untrained: the same cost as a
trained one). Metrics: FID, KID, precision/recall on the extracted features; SSIM, PSNR,
MS-SSIM on image pairs; the memorisation audit (nearest neighbours in pixel space). Each figure
is the best of `--repeats` runs; only compare figures from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import time


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--inception-images", type=int, default=32, help="InceptionV3 is ~6 GFLOP per image: time it on fewer")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import numpy as np
    import torch

    from synthmed.data.phantoms.histology import phantom_samples
    from synthmed.evaluation import paired
    from synthmed.models.tasknets import build_classifier, features
    from synthmed.evaluation.fidelity import frechet_distance, kernel_inception_distance, precision_recall
    from synthmed.evaluation.inception import build_fid_inception, inception_features
    from synthmed.evaluation.memorisation import audit

    n, size = a.n_images, a.resolution
    tiles = [t for t, _ in zip(phantom_samples(0, min(size, 256), n_slides=max(3, 2 * n // 12 + 1), tiles_per_slide=12, n_unlabelled_slides=0), range(2 * n))]
    images = np.stack([t.image for t in tiles])  # (2n, H, W, 3)
    real, fake = images[:n], images[n:]
    inception = build_fid_inception(seed=0).eval()
    domain = build_classifier(6).eval()
    rows = []

    def add(name: str, count: int, seconds: float, unit: str = "images/s"):
        rows.append({"what": name, "n": count, "seconds": seconds, "rate": count / seconds, "unit": unit})
        print(f"  {name:<34} {count / seconds:>10.1f} {unit}  ({count} in {seconds:.2f} s)", flush=True)

    print(f"evaluation: {n} + {n} images, {size} px, {torch.get_num_threads()} threads", flush=True)
    k = min(a.inception_images, n)
    add("features: InceptionV3 (FID)", k, _best(lambda: inception_features(inception, real[:k]), a.repeats))
    add("features: domain classifier", n, _best(lambda: features(domain, real), a.repeats))
    fr, ff = features(domain, real).astype(np.float64), features(domain, fake).astype(np.float64)
    add("FID (256-d)", 1, _best(lambda: frechet_distance(fr, ff), a.repeats), "sets/s")
    add("KID (100 subsets)", 1, _best(lambda: kernel_inception_distance(fr, ff), a.repeats), "sets/s")
    add("precision/recall (k=3)", 1, _best(lambda: precision_recall(fr, ff), a.repeats), "sets/s")
    add("SSIM (BCI protocol)", n, _best(lambda: paired.ssim(real, fake), a.repeats))
    add("PSNR", n, _best(lambda: paired.psnr(real, fake), a.repeats))
    add("MS-SSIM (3 scales, 7 px)", n, _best(lambda: paired.ms_ssim(real, fake), a.repeats))
    half = n // 2
    add("memorisation audit (pixels)", half, _best(lambda: audit(fake[:half], real, fake[half:]), a.repeats))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"settings": vars(a), "rows": rows, "threads": torch.get_num_threads()}, fh, indent=2)


if __name__ == "__main__":
    main()

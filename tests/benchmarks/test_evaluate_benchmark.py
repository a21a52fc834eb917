"""benchmarks/evaluate.py keeps working as the evaluation code changes (a smoke run, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

N_IMAGES, INCEPTION_IMAGES = 24, 2
# what each row times, by name, and how many items it must have timed: images, or whole feature sets
EXPECTED = {"features: InceptionV3": (INCEPTION_IMAGES, "images/s"), "features: domain classifier": (N_IMAGES, "images/s"),
            "FID": (1, "sets/s"), "KID": (1, "sets/s"), "precision/recall": (1, "sets/s"), "SSIM": (N_IMAGES, "images/s"),
            "PSNR": (N_IMAGES, "images/s"), "MS-SSIM": (N_IMAGES, "images/s"), "memorisation audit": (N_IMAGES // 2, "images/s")}


def test_evaluate_benchmark_times_every_extractor_and_metric(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evaluate.py"), "--n-images", str(N_IMAGES), "--repeats", "1",
                           "--inception-images", str(INCEPTION_IMAGES), "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["settings"] | {"json": None} == {"n_images": N_IMAGES, "resolution": 64, "repeats": 1, "inception_images": INCEPTION_IMAGES, "json": None}
    rows = result["rows"]
    assert sorted(r["what"].split(" (")[0] for r in rows) == sorted(EXPECTED)  # each timed once, none missing
    for r in rows:
        assert set(r) == {"what", "n", "seconds", "rate", "unit"}, r
        assert (r["n"], r["unit"]) == EXPECTED[r["what"].split(" (")[0]], r  # it timed what it was asked to
        assert r["seconds"] > 0 and r["rate"] == pytest.approx(r["n"] / r["seconds"], rel=1e-9), r
        # the printed table says what the JSON says
        assert f"{r['what']:<34} {r['rate']:>10.1f} {r['unit']}  ({r['n']} in {r['seconds']:.2f} s)" in proc.stdout, r
    assert f"evaluation: {N_IMAGES} + {N_IMAGES} images, 64 px, {result['threads']} threads" in proc.stdout

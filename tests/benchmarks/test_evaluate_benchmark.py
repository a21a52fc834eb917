"""benchmarks/evaluate.py keeps working as the evaluation code changes (a smoke run, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_benchmark_times_every_extractor_and_metric(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evaluate.py"), "--n-images", "24", "--repeats", "1", "--inception-images", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["what"].split(" (")[0] for r in rows} >= {"features: InceptionV3", "features: domain classifier", "FID", "KID", "SSIM", "PSNR", "MS-SSIM", "memorisation audit"}
    assert all(r["rate"] > 0 for r in rows)

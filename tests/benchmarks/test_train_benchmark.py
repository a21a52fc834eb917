"""benchmarks/train.py keeps working as the training code changes (a smoke run, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_benchmark_measures_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--steps", "2", "--warmup", "1", "--n-images", "8", "--batch-size", "4", "--variants", "cached", "uncached", "channels_last", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train.py"), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["cached", "uncached", "channels_last"]
    assert all(r["img_s"] > 0 and r["peak_mb"] > 0 for r in rows) and rows[1]["cache_s"] < rows[0]["cache_s"]

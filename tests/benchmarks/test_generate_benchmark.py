"""benchmarks/generate.py keeps working as the generation code changes (a smoke run, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generate_benchmark_compares_with_the_pipeline(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--n-images", "4", "--batch-size", "4", "--steps", "2", "--repeats", "1", "--variants", "synthmed", "synthmed_contiguous", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["pipeline", "synthmed", "synthmed_contiguous"]
    assert all(r["img_s"] > 0 for r in rows) and rows[0]["ratio"] == 1.0
    assert rows[2]["max_abs_diff"] == 0  # contiguous fp32 at a multiple of 4 rows: the pipeline's exact pixels

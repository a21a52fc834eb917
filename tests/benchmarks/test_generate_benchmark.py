"""benchmarks/generate.py keeps working as the generation code changes (a smoke run, not a timing)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_generate_benchmark_compares_with_the_pipeline(tmp_path):
    out = tmp_path / "bench.json"
    n_images, repeats = 4, 2
    args = ["--n-images", str(n_images), "--batch-size", "4", "--steps", "2", "--repeats", str(repeats), "--variants", "synthmed", "synthmed_contiguous",
            "--json", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {k: result["settings"][k] for k in ("n_images", "batch_size", "steps", "repeats")} == {"n_images": n_images, "batch_size": 4, "steps": 2, "repeats": repeats}
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["pipeline", "synthmed", "synthmed_contiguous"]
    base = statistics.median(rows[0]["seconds"])
    for r in rows:
        assert set(r) == {"variant", "img_s", "ratio", "seconds", "max_abs_diff"}, r
        assert len(r["seconds"]) == repeats and all(s > 0 for s in r["seconds"])  # one timing per repeat, the warm-up left out
        median = statistics.median(r["seconds"])
        assert r["img_s"] == pytest.approx(n_images / median) and r["ratio"] == pytest.approx(base / median)  # img/s and ratio from those timings
        assert f"{r['variant']:<26}{r['img_s']:>8.2f}{r['ratio']:>12.2f}{r['max_abs_diff']:>12}" in proc.stdout  # the printed table agrees
    assert rows[0]["ratio"] == 1.0 and rows[0]["max_abs_diff"] == 0
    assert rows[2]["max_abs_diff"] == 0  # contiguous fp32 at a multiple of 4 rows: the pipeline's exact pixels
    assert rows[1]["max_abs_diff"] <= 1  # channels-last fp32: the same computation, at most the last bit of a pixel

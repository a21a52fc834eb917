"""benchmarks/scale.py runs every stage on a small source (a smoke run, not a measurement)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_scale_benchmark_runs_every_stage_and_reports_time_and_memory(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--n", "36", "--size", "64", "--views", "2", "--work", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == ["prepare", "train", "generate", "evaluate", "downstream"] and all(r["exit"] == 0 for r in rows), proc.stdout
    for r in rows:
        assert r["seconds"] > 0 and 0.1 < r["peak_rss_gb"] < 24  # a process that imported torch: hundreds of MB, not a unit slip
        assert f"{r['stage']:<12}{r['seconds']:>10.1f}{r['peak_rss_gb']:>13.2f}" in proc.stdout
    card = json.loads((tmp_path / "w" / "data" / "dataset.json").read_text())
    assert sum(s["n"] for s in card["splits"].values()) == 36 and card["image_size"] == [64, 64]
    training = json.loads((tmp_path / "w" / "run" / "training.json").read_text())
    assert training["views"] == [0, 4] and training["latent_cache"]["reused"] is False

"""Peak memory of `prepare pannuke` on a full-size fold (slow: writes about 3.8 GB of fixture)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "prepare.py"
pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_pannuke_800_patches_stays_under_1_gb(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_prepare", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    options, _ = bench.write_fixture("pannuke", tmp_path / "src", pannuke_patches=800)
    masks = tmp_path / "src" / "Fold 1" / "masks" / "fold1" / "masks.npy"
    assert masks.stat().st_size > 2.4e9  # the real fold's scale: 800 x 256 x 256 x 6 float64
    result = bench.run_prepare("pannuke", tmp_path / "src", tmp_path / "out", options, workers=1)
    assert result["n"] == 800
    assert result["rss_main_mb"] < 1024 and result["rss_worker_mb"] < 1024

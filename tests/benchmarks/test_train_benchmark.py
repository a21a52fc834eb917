"""benchmarks/train.py keeps working as the training code changes (a smoke run, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_train_benchmark_measures_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    steps, batch = 2, 4
    args = ["--steps", str(steps), "--warmup", "1", "--n-images", "8", "--batch-size", str(batch), "--variants", "cached", "uncached", "channels_last",
            "--json", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train.py"), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {k: result["spec"][k] for k in ("steps", "warmup", "n_images", "batch_size")} == {"steps": steps, "warmup": 1, "n_images": 8, "batch_size": batch}
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["cached", "uncached", "channels_last"]
    for r in rows:
        assert set(r) == {"variant", "img_s", "train_s", "cache_s", "peak_mb", "device", "img_s_incl_cache"}, r
        # img/s counts the timed steps x batch over the timed seconds; "incl. cache" adds the one-off cache time
        assert r["train_s"] > 0 and r["img_s"] == pytest.approx(steps * batch / r["train_s"])
        assert r["img_s_incl_cache"] == pytest.approx(steps * batch / (r["train_s"] + r["cache_s"])) and r["img_s_incl_cache"] < r["img_s"]
        assert r["peak_mb"] > 100  # a process that loaded torch and a backbone: hundreds of MB, not a unit slip
        ratio = r["img_s"] / rows[0]["img_s"]
        assert f"{r['variant']:<14} {r['img_s']:>8.1f} {ratio:>6.2f} {r['img_s_incl_cache']:>18.1f} {r['cache_s']:>8.1f} {r['peak_mb']:>9.0f}" in proc.stdout
    assert rows[1]["cache_s"] < rows[0]["cache_s"]  # uncached skips the latent cache

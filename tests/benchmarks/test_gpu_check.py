"""benchmarks/gpu_check.sh runs end to end on the CPU at the tiny size (a smoke run: its figures say nothing about a GPU)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_gpu_check_prints_one_table_from_real_runs(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "did not finish" not in proc.stderr, proc.stderr[-3000:]
    table = proc.stdout
    assert table == (out / "table.txt").read_text()
    train, memory, gen = (json.loads((out / f"{n}.json").read_text()) for n in ("train", "memory", "generate"))
    t, m = train["rows"][0], memory["rows"][0]
    g = {r["variant"]: r for r in gen["rows"]}
    # every figure in the table is the one its step measured
    assert f"| training img/s (synthmed) | {t['img_s']:.2f} |" in table
    assert t["flops_per_step"] > 0 and f"| FLOPs per training step (forward + backward) | {t['flops_per_step'] / 1e12:.3g} TFLOP |" in table
    assert f"| peak memory, batch 1, gradient checkpointing | {m['peak_mb'] / 1024:.2f} GB | < 12 GB |" in table
    assert memory["spec"]["batch_size"] == 1 and memory["spec"]["gradient_checkpointing"]
    assert f"= {g['synthmed']['ratio']:.2f}x | >= 1.3x |" in table and g["pipeline"]["img_s"] > 0
    assert "n/a (no --diffusers-script given)" in table
    assert re.search(r"model FLOP utilisation \| n/a", table)  # a CPU has no known peak


def test_gpu_check_refuses_a_missing_diffusers_script(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--diffusers-script", str(tmp_path / "nope.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'nope.py'}: diffusers' train_controlnet.py not found"

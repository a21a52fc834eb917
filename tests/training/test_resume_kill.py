"""`train controlnet` killed with SIGKILL mid-run, then `--resume latest`: the same model as an uninterrupted run.

SIGKILL gives the process no chance to clean up, so whatever it was doing (a step, a
checkpoint half written under .tmp-step-N, a rotation) is left as it was; only the renamed,
complete step-N checkpoints may be trusted by the resume.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from synthmed.core.io import read_json

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

STEPS, EVERY, KILL_AT = 12, 2, 4
POLL_SECONDS, KILL_TIMEOUT = 0.02, 300
ATOL = 1e-6  # same process count and threads, batches/noise a function of (seed, step): a resume is exact up to rounding
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _command(data, out, backbone, *extra: str) -> list[str]:
    return [sys.executable, "-m", "synthmed.cli", "train", "controlnet", "--data", str(data), "--out", str(out), "--backbone", str(backbone),
            "--steps", str(STEPS), "--batch-size", "4", "--seed", "0", "--set", f"checkpoint_every={EVERY}", "--set", "log_with=null", *extra]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start the CLI with stdout/stderr to a file (a full pipe would stall the child).

    One thread each: two runs share the cores, and oversubscribed OpenMP threads spin-wait
    (a 12-step run then takes minutes instead of seconds).
    """
    env = dict(os.environ, SYNTHMED_NO_PROGRESS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def _finish(proc: subprocess.Popen, log: Path, timeout: int = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args[-1]}: no exit within {timeout}s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def _complete_steps(checkpoints: Path) -> list[int]:
    """Steps of the renamed (complete) checkpoints; .tmp-step-N folders are half written."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(m.group(1)) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def _kill_after_checkpoint(proc: subprocess.Popen, checkpoints: Path, log: Path) -> None:
    """Poll until a complete checkpoint at step >= KILL_AT exists, then SIGKILL the run."""
    deadline = time.monotonic() + KILL_TIMEOUT
    while not any(s >= KILL_AT for s in _complete_steps(checkpoints)):
        if proc.poll() is not None:
            pytest.fail(f"training exited (code {proc.returncode}) before a checkpoint at step >= {KILL_AT}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"no checkpoint at step >= {KILL_AT} in {checkpoints} within {KILL_TIMEOUT}s:\n{log.read_text()[-3000:]}")
        time.sleep(POLL_SECONDS)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"training was not killed (exit code {proc.returncode}): raise STEPS"


def test_killed_run_resumes_to_the_uninterrupted_model(tiny_backbone_dir, phantom_data, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    # The uninterrupted reference runs alongside (same command, same thread count: the same numbers).
    reference = _start(_command(phantom_data, straight, tiny_backbone_dir), tmp_path / "straight.log")
    victim = _start(_command(phantom_data, killed, tiny_backbone_dir), tmp_path / "killed.log")
    try:
        _kill_after_checkpoint(victim, killed / "checkpoints", tmp_path / "killed.log")
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()

    assert not (killed / "controlnet").exists() and not (killed / "training.json").exists()
    assert not list(killed.glob(".controlnet*"))
    done = _complete_steps(killed / "checkpoints")[-1]
    assert KILL_AT <= done < STEPS and done % EVERY == 0
    # A checkpoint caught mid-write, as a kill during save_state leaves it (if this kill did not make one).
    half = killed / "checkpoints" / f".tmp-step-{done + EVERY}"
    if not list((killed / "checkpoints").glob(".tmp-step-*")):
        half.mkdir()
        (half / "model.safetensors").write_bytes(b"\x00" * 10)

    resumed_log = tmp_path / "resumed.log"
    _finish(_start(_command(phantom_data, killed, tiny_backbone_dir, "--resume", "latest"), resumed_log), resumed_log)
    _finish(reference, tmp_path / "straight.log")

    resumed, full = read_json(killed / "training.json"), read_json(straight / "training.json")
    assert resumed["steps"] == full["steps"] == STEPS
    assert len(full["last_losses"]) == STEPS
    # the resumed record covers the whole training: every step's loss, and both invocations
    assert resumed["last_losses"] == pytest.approx(full["last_losses"], abs=ATOL)
    assert [(r["from_step"], r["to_step"]) for r in resumed["runs"]] == [(0, done), (done, STEPS)] and resumed["resumed"]
    assert [(r["from_step"], r["to_step"]) for r in full["runs"]] == [(0, STEPS)] and not full["resumed"]
    assert resumed["seconds"] >= resumed["runs"][0]["seconds"]
    for out in (killed, straight):
        assert _complete_steps(out / "checkpoints") == [STEPS - EVERY, STEPS]  # keep_checkpoints=2
        assert not list((out / "checkpoints").glob(".tmp-step-*"))

    a = load_file(killed / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(straight / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert set(a) == set(b)
    worst = max(a, key=lambda k: float((a[k] - b[k]).abs().max()))
    assert float((a[worst] - b[worst]).abs().max()) <= ATOL, f"{worst}: resumed vs uninterrupted differ by {float((a[worst] - b[worst]).abs().max()):.3g}"

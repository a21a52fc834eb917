"""Bad input across the commands: exit code 2, one `error:` line naming the file or setting, nothing left behind.

Each case builds its inputs in a fresh folder, runs the real CLI (in process, through click's runner: one
interpreter for all cases), and checks that the folder holds exactly what it held before. A case whose
command raises anything but the one-line error gets its traceback in the output, so `Traceback` never
appearing in any output is part of the check. SYNTHMED_BAD_INPUT_LOG=FILE also writes every case's output
there (`grep -c Traceback FILE` prints 0).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthmed.testing.folder import scene
from synthmed.data.metadata import read_metadata

ROOT = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"[^:]+: \d+/\d+( loss \S+)?( \(\S+/s, \S+( left)?\))?")  # a job's progress line (core/progress.py), not an error


# --- inputs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(quick_demo):
    """The quick demo's prepared set, trained model and synthetic set (built once per session)."""
    out, proc = quick_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy_set(quick: Path, w: Path) -> Path:
    d = w / "set"
    shutil.copytree(quick / "data", d)
    return d


def _first(d: Path, key: str = "file_name", split: str = "train") -> Path:
    row = read_metadata(d / split / "metadata.jsonl")[0]
    return d / split / row[key]


def _edit(path: Path, fn) -> None:
    Image.fromarray(fn(np.array(Image.open(path)))).save(path)


def _image_mask_source(w: Path, n: int = 6) -> Path:
    """A `folder` source in the image-mask layout: n small grey scenes with 0/1/2 masks."""
    root = w / "src"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img, codes = scene(rng, 32, 32, rgb=False)
        Image.fromarray(img).save(root / "images" / f"x{i}.png")
        Image.fromarray(codes).save(root / "masks" / f"x{i}.png")
    return root


def _busi_source(w: Path) -> Path:
    from synthmed.testing import busi

    busi.write(w / "src")
    return w / "src"


def _transparent(path: Path) -> None:
    rgb = np.array(Image.open(path).convert("RGB"))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[0, 0] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(path)


def _prepare_folder(w, bad):
    """A folder source with one bad item (`bad(root)` spoils it); prepare it."""
    root = _image_mask_source(w)
    bad(root)
    return ("prepare", "folder", "--root", root, "--out", w / "out", "--workers", "1")


def _spoil_set(quick, w, key, fn, cmd="train"):
    d = _copy_set(quick, w)
    fn(_first(d, key))
    return _on_set(quick, w, d, cmd)


def _on_set(quick, w, d, cmd):
    model = quick / "controlnet"
    if cmd == "train":
        return ("train", "controlnet", "--data", d, "--out", w / "out", "--steps", "2")
    if cmd == "generate":
        return ("generate", "--data", d, "--model", model, "--out", w / "out", "--n", "2", "--steps", "2")
    return ("evaluate", "--data", d, "--synthetic", quick / "synthetic", "--out", w / "out", "-s", "segmenter.steps=2")


def _binary_set(w: Path) -> Path:
    """A small phantom set with 1-channel (binary) conditioning: the quick model was trained on 3 (colour)."""
    from synthmed import pipelines
    from synthmed.config import ConditioningConfig, PhantomConfig, PrepareConfig

    out = w / "binary"
    pipelines.prepare(PrepareConfig(phantom=PhantomConfig(n_slides=4, tiles_per_slide=2, n_unlabelled_slides=0),
                                    conditioning=ConditioningConfig(builders=["binary"])), out)
    return out


def _no_weights(quick, w):
    m = w / "model"
    shutil.copytree(quick / "controlnet", m)
    for f in (m / "controlnet").glob("*.safetensors"):
        f.unlink()
    return m


def _bad_yaml(w, text):
    (w / "c.yaml").write_text(text)
    return w / "c.yaml"


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def _busy(w):
    (w / "busy").mkdir()
    (w / "busy" / "mine.txt").write_text("keep me")
    return w / "busy"


# case id -> (setup(quick, w) -> argv, text the one error line must contain)
CASES = {
    # prepare: settings
    "prepare-unknown-format": (lambda q, w: ("prepare", "no-such-format", "--out", w / "out"), "unknown source format"),
    "prepare-size-0": (lambda q, w: ("prepare", "phantom-histology", "--size", "0", "--out", w / "out"), "size"),
    "prepare-size-0-nested-out": (lambda q, w: ("prepare", "phantom-histology", "--size", "0", "--out", w / "new" / "deeper" / "out"), "size"),
    "prepare-size-100": (lambda q, w: ("prepare", "phantom-histology", "--size", "100", "--out", w / "out"), "64, 128 or 256"),
    "prepare-limit-negative": (lambda q, w: ("prepare", "phantom-histology", "--limit", "-1", "--out", w / "out"), "limit"),
    "prepare-resize-unknown": (lambda q, w: ("prepare", "phantom-histology", "--resize", "squash", "--out", w / "out"), "resize"),
    "prepare-option-without-equals": (lambda q, w: ("prepare", "phantom-histology", "-o", "level", "--out", w / "out"), "KEY=VALUE"),
    "prepare-out-is-a-file": (lambda q, w: ((w / "f").write_text("x"), ("prepare", "phantom-histology", "--out", w / "f"))[1], "not a folder"),
    "prepare-out-not-empty": (lambda q, w: ("prepare", "phantom-histology", "--out", _busy(w)), "not empty"),
    "prepare-root-missing": (lambda q, w: ("prepare", "folder", "--root", w / "nowhere", "--out", w / "out"), str("nowhere")),
    "prepare-medmnist-no-data": (lambda q, w: ("prepare", "medmnist", "--root", w, "--flag", "pathmnist", "--out", w / "out"), "no medmnist data"),
    # prepare: bad items in a source (each refused as it is read; OUT.partial must not survive the refusal)
    "prepare-random-bytes-png": (lambda q, w: _prepare_folder(w, lambda r: _random_bytes(r / "images" / "x3.png")), "x3.png: cannot read image"),
    "prepare-truncated-png": (lambda q, w: _prepare_folder(w, lambda r: _truncate(r / "images" / "x3.png")), "x3.png: cannot read image"),
    "prepare-mask-other-size": (lambda q, w: _prepare_folder(w, lambda r: Image.fromarray(np.zeros((20, 20), np.uint8)).save(r / "masks" / "x3.png")), "differs from image size"),
    "prepare-mask-code-not-defined": (lambda q, w: (lambda a: a + ("-o", "classes=lesion"))(_prepare_folder(w, lambda r: None)), "not defined"),
    "prepare-mask-16bit-codes": (lambda q, w: _prepare_folder(w, lambda r: Image.fromarray(np.full((32, 32), 300, np.uint16)).save(r / "masks" / "x3.png")), "outside 0..255"),
    "prepare-missing-mask": (lambda q, w: _prepare_folder(w, lambda r: (r / "masks" / "x3.png").unlink()), "no mask"),
    "prepare-transparent-image": (lambda q, w: _prepare_folder(w, lambda r: _transparent(r / "images" / "x3.png")), "transparent"),
    "prepare-busi-transparent-image": (lambda q, w: (lambda root: (_transparent(next((root / "Dataset_BUSI_with_GT" / "benign").glob("benign (1).png"))),
                                                                   ("prepare", "busi", "--root", root, "--out", w / "out", "--workers", "1"))[1])(_busi_source(w)),
                                       "transparent"),
    # train controlnet: the prepared set, checked file by file as it is read
    "train-data-missing": (lambda q, w: ("train", "controlnet", "--data", w / "missing", "--out", w / "out"), "folder not found"),
    "train-data-not-prepared": (lambda q, w: ((w / "empty").mkdir(), ("train", "controlnet", "--data", w / "empty", "--out", w / "out"))[1], "not a prepared data set"),
    "train-mask-other-size": (lambda q, w: _spoil_set(q, w, "mask", lambda p: Image.fromarray(np.zeros((32, 32), np.uint8)).save(p)), "mask size 32x32 differs"),
    "train-conditioning-other-size": (lambda q, w: _spoil_set(q, w, "conditioning_image", lambda p: Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)),
                                      "conditioning size 32x32 differs"),
    "train-mask-code-above-classes": (lambda q, w: _spoil_set(q, w, "mask", lambda p: _edit(p, lambda m: (m.__setitem__((0, 0), 9), m)[1])), "class code(s) [9]"),
    "train-rgb-mask": (lambda q, w: _spoil_set(q, w, "mask", lambda p: _edit(p, lambda m: np.dstack([m, m, m]))), "mask has 3 channels"),
    "train-transparent-image": (lambda q, w: _spoil_set(q, w, "file_name", _transparent), "transparent"),
    "train-image-other-size": (lambda q, w: _spoil_set(q, w, "file_name", lambda p: Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(p)), "differs from"),
    "train-corrupt-image": (lambda q, w: _spoil_set(q, w, "file_name", _random_bytes), "cannot read image"),
    "train-missing-image": (lambda q, w: _spoil_set(q, w, "file_name", Path.unlink), "file not found"),
    "train-bad-metadata-json": (lambda q, w: (lambda d: ((d / "train" / "metadata.jsonl").write_text("{not json\n"), _on_set(q, w, d, "train"))[1])(_copy_set(q, w)),
                                "metadata.jsonl:1: not valid JSON"),
    "train-backbone-no-weights": (lambda q, w: ((w / "bb" / "vae").mkdir(parents=True), (w / "bb" / "model_index.json").write_text("{}"),
                                                ("train", "controlnet", "--data", q / "data", "--out", w / "out", "--backbone", w / "bb"))[2], "no config.json"),
    "train-backbone-unknown": (lambda q, w: ("train", "controlnet", "--data", q / "data", "--out", w / "out", "--backbone", "huge"), "unknown backbone"),
    "train-steps-zero": (lambda q, w: ("train", "controlnet", "--data", q / "data", "--out", w / "out", "--steps", "0"), "steps"),
    "train-unknown-setting": (lambda q, w: ("train", "controlnet", "--data", q / "data", "--out", w / "out", "-s", "no_such=1"), "no_such"),
    "train-set-without-equals": (lambda q, w: ("train", "controlnet", "--data", q / "data", "--out", w / "out", "-s", "steps"), "KEY=VALUE"),
    "train-resume-not-a-checkpoint": (lambda q, w: ("train", "controlnet", "--data", q / "data", "--out", w / "out", "--resume", "bogus"), "--resume expects"),
    "train-decoder-unknown-class": (lambda q, w: ("train", "controlnet", "--data", q / "data", "--out", w / "out", "-s", "decoder.steps=2",
                                                  "-s", "decoder.class_weights={necrotic: 3}"), "necrotic"),
    "train-config-missing": (lambda q, w: ("train", "controlnet", "--data", q / "data", "--out", w / "out", "--config", w / "no.yaml"), "config file not found"),
    "train-config-bad-yaml": (lambda q, w: ("train", "controlnet", "--data", q / "data", "--out", w / "out", "--config", _bad_yaml(w, "steps: [1\n")), "not valid YAML"),
    # generate: refused before any sampling
    "generate-model-no-weights": (lambda q, w: ("generate", "--data", q / "data", "--model", _no_weights(q, w), "--out", w / "out", "--n", "2"), "no ControlNet weights"),
    "generate-model-not-a-model": (lambda q, w: ("generate", "--data", q / "data", "--model", q / "data", "--out", w / "out", "--n", "2"), "not a trained model folder"),
    "generate-conditioning-channels": (lambda q, w: ("generate", "--data", _binary_set(w), "--model", q / "controlnet", "--out", w / "out", "--n", "2"), "trained on 3"),
    "generate-export-unknown": (lambda q, w: ("generate", "--data", q / "data", "--model", q / "controlnet", "--out", w / "out", "--n", "2", "--export", "bogus"),
                                "unknown export format 'bogus'"),
    "generate-export-medmnist-segmentation": (lambda q, w: ("generate", "--data", q / "data", "--model", q / "controlnet", "--out", w / "out", "--n", "2",
                                                            "--export", "medmnist"), "medmnist is for classification"),
    "generate-mask-code-above-classes": (lambda q, w: _spoil_set(q, w, "mask", lambda p: _edit(p, lambda m: (m.__setitem__((0, 0), 9), m)[1]), "generate"), "class code(s) [9]"),
    "generate-instance-mask-other-size": (lambda q, w: _spoil_set(q, w, "instance_mask", lambda p: Image.fromarray(np.zeros((16, 16), np.uint16)).save(p), "generate"),
                                          "instance mask"),
    "generate-plan-unknown": (lambda q, w: ("generate", "--data", q / "data", "--model", q / "controlnet", "--out", w / "out", "--plan", "bogus"), "plan.mode"),
    "generate-n-zero": (lambda q, w: ("generate", "--data", q / "data", "--model", q / "controlnet", "--out", w / "out", "--n", "0"), "n_samples"),
    "generate-filter-unknown": (lambda q, w: ("generate", "--data", q / "data", "--model", q / "controlnet", "--out", w / "out", "--filter", "bogus"), "filter.by"),
    # evaluate and export
    "evaluate-missing-synthetic": (lambda q, w: ("evaluate", "--data", q / "data", "--out", w / "out"), "--synthetic"),
    "evaluate-mask-code-above-classes": (lambda q, w: _spoil_set(q, w, "mask", lambda p: _edit(p, lambda m: (m.__setitem__((0, 0), 9), m)[1]), "evaluate"), "class code(s) [9]"),
    "evaluate-synthetic-not-prepared": (lambda q, w: ((w / "empty").mkdir(), ("evaluate", "--data", q / "data", "--synthetic", w / "empty", "--out", w / "out"))[1],
                                        "not a prepared data set"),
    "evaluate-roundtrip-unknown-split": (lambda q, w: ("evaluate", "roundtrip", "--data", q / "data", "--out", w / "out", "--split", "nosuch"), "no split 'nosuch'"),
    "evaluate-downstream-bad-synthetic": (lambda q, w: ("evaluate", "downstream", "--data", q / "data", "--out", w / "out", "--synthetic", "half=x"), "--synthetic expects"),
    "export-medmnist-segmentation": (lambda q, w: ("export", q / "synthetic", "--format", "medmnist", "--out", w / "out"), "medmnist is for classification"),
    "export-medmnist-segmentation-real": (lambda q, w: ("export", q / "synthetic", "--format", "medmnist", "--out", w / "out", "--real", q / "data"),
                                          "medmnist is for classification"),
    "export-unknown-format": (lambda q, w: ("export", q / "synthetic", "--format", "bogus", "--out", w / "out"), "unknown export format"),
    # run, demo, report
    "run-config-is-a-folder": (lambda q, w: ("run", ROOT / "configs", "--out", w / "out"), "is a folder"),
    "run-config-missing": (lambda q, w: ("run", w / "nope.yaml", "--out", w / "out"), "config file not found"),
    "run-data-missing": (lambda q, w: ("run", ROOT / "experiments" / "data_augmentation.yaml", "--quick", "--out", w / "out", "-s", f"data={w / 'nonexistent'}"),
                         "folder not found"),
    "run-bad-setting": (lambda q, w: ("run", _bad_yaml(w, "controlnet: {steps: -3}\n"), "--out", w / "out"), "controlnet.steps"),
    "run-quick-without-section": (lambda q, w: ("run", _bad_yaml(w, "experiment: generation\n"), "--quick", "--out", w / "out"), "quick"),
    "demo-out-not-empty": (lambda q, w: ("demo", "--quick", "--out", _busy(w)), "not empty"),
    "report-results-missing": (lambda q, w: ("report", w / "results.json", "--out", w / "r.html"), "file not found"),
    "report-results-not-json": (lambda q, w: ((w / "results.json").write_text("{"), ("report", w / "results.json", "--out", w / "r.html"))[1], "not valid JSON"),
}


def _tree(folder: Path) -> dict[str, int]:
    """Every path under `folder` with its size (folders: -1), to compare before and after a command."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1) for p in sorted(folder.rglob("*"))}


def _invoke(args) -> tuple[int, str]:
    """Run the CLI in this process; returns (exit code, stdout + stderr, with the traceback of anything uncaught)."""
    from typer.testing import CliRunner

    from synthmed.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    text = result.stdout + result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += "".join(traceback.format_exception(result.exception))
    return result.exit_code, text


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, quick, tmp_path):
    setup, needle = CASES[case]
    w = tmp_path / "w"
    w.mkdir()
    args = setup(quick, w)
    before = _tree(w)
    code, text = _invoke(args)
    if os.environ.get("SYNTHMED_BAD_INPUT_LOG"):
        with open(os.environ["SYNTHMED_BAD_INPUT_LOG"], "a") as fh:
            fh.write(f"### {case}: exit {code}\n{text}\n")
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip() and not PROGRESS.fullmatch(line)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (code, text)
    assert _tree(w) == before, f"{case} left: {sorted(set(_tree(w)) - set(before))}"
    assert not (w / "out.lock").exists()


def test_the_suite_covers_forty_distinct_inputs():
    assert len(CASES) >= 40 and len({c.split("-")[0] for c in CASES}) >= 7  # prepare, train, generate, evaluate, export, run, demo, report


# --- one writer per output ----------------------------------------------------------------------------------


def _cli(*args, **popen):
    env = dict(os.environ, SYNTHMED_NO_PROGRESS="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "synthmed.cli", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_two_generate_commands_on_one_output(quick, tmp_path):
    """The second writer is refused with one line naming the first's pid; the first finishes a complete output."""
    out = tmp_path / "syn"
    args = ("generate", "--data", quick / "data", "--model", quick / "controlnet", "--out", out, "--n", "8", "--steps", "8", "--filter", "none")
    first = _cli(*args)
    deadline = time.monotonic() + 120
    while not (tmp_path / "syn.lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = _cli(*args)
    _, err2 = second.communicate(timeout=300)
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-3000:]
    lines = err2.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and f"pid {first.pid}" in lines[0] and "another synthmed command is writing it" in lines[0], err2
    assert len((out / "train" / "metadata.jsonl").read_text().splitlines()) == 8
    assert not (tmp_path / "syn.lock").exists() and not (tmp_path / "syn.partial").exists()


def test_a_killed_writers_lock_is_taken_over_with_a_note(quick, tmp_path):
    """A lock file whose holder is gone (kill -9 leaves one) does not block: the next run says it took it over."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "syn.lock").write_text(f"{dead.pid}\n")
    proc = _cli("generate", "--data", quick / "data", "--model", quick / "controlnet", "--out", tmp_path / "syn", "--n", "2", "--steps", "2", "--filter", "none")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"note: took over the lock of pid {dead.pid}, which is no longer running" in err
    assert not (tmp_path / "syn.lock").exists()

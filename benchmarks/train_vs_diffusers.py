"""Compare synthmed's ControlNet training throughput with diffusers' own examples/controlnet/train_controlnet.py.

diffusers' script is not part of synthmed and is never copied into it: fetch the one from the
release tag that matches the installed diffusers, and install what it imports (neither package
is a synthmed dependency):

    V=$(python -c "import diffusers; print(diffusers.__version__)")
    curl -fL -o /tmp/train_controlnet.py \\
        https://raw.githubusercontent.com/huggingface/diffusers/v$V/examples/controlnet/train_controlnet.py
    pip install datasets torchvision      # torchvision built for your torch (CPU or CUDA)

    python benchmarks/train_vs_diffusers.py --diffusers-script /tmp/train_controlnet.py       # CPU: sd15, random weights, 64 px
    python benchmarks/train_vs_diffusers.py --diffusers-script /tmp/train_controlnet.py \\
        --resolution 512 --batch-size 8 --steps 10 30 --mixed-precision fp16                 # a GPU

Both tools get the same interpreter, backbone folder, train images, conditioning images and
captions, resolution, batch size, steps, learning rate, precision and attention (PyTorch SDPA
unless --xformers). Each tool is run twice in fresh processes, for N1 and N2 steps (order
synthmed N1, diffusers N1, synthmed N2, diffusers N2, so slow drift of the machine hits both
alike), and timed from outside: img/s = (N2 - N1) x batch / (T2 - T1), which cancels start-up,
model loading, data preparation and final saving for both; "one-off" = T1 - N1 x batch / img/s.
"in-run img/s" is a cross-check from each tool's own progress output during the N2 run.

Peak memory: CPU, the peak resident set of each training process (its VmHWM, from wait4);
CUDA, also the peak of nvidia-smi's memory.used for the device during the run minus before it
(device-wide: includes the CUDA context and the allocator's cached blocks, so it is larger than
torch.cuda.max_memory_allocated, for both tools alike).

What stays different by design, and so is part of the comparison: synthmed encodes latents and
prompts once, for every train image in each of its 8 flip/rotation views (a one-off that grows
with the data set; diffusers runs the VAE and text encoder on every batch and does not augment;
`--synthmed-set cache_latents=false` or `--synthmed-set augment.flips=false` narrow this);
synthmed's gradient checkpointing also covers the frozen UNet; synthmed saves a checkpoint at the last step and diffusers logs to TensorBoard every
step (its default), both small or one-off. The backbone's VAE must downsample by 8: diffusers'
script builds `ControlNetModel.from_unet(unet)` with the default conditioning embedding
(16, 32, 96, 256), which downsamples by 8, so synthmed's tiny preset (VAE factor 4) cannot run
there; the default is the sd15 architecture with random weights at --resolution.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_PROBE = r"""
import json, torch, diffusers, datasets
import torchvision.transforms  # what train_controlnet.py imports
import synthmed.cli  # warms the same imports the synthmed side needs
cuda = torch.cuda.is_available()
print(json.dumps({"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "diffusers": diffusers.__version__, "datasets": datasets.__version__}))
"""
_BUILD = r"""
import sys
from synthmed.models.backbone import build_backbone
from synthmed.models.registry import get_preset
name, resolution, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
build_backbone(name, seed=0, sample_size=resolution // get_preset(name).vae_scale_factor).save(
    folder, recipe={"made_by": "benchmarks/train_vs_diffusers.py", "preset": name, "weights": "random, seed 0"})
"""
_PROGRESS = {"synthmed": re.compile(r"train controlnet: (\d+)/(\d+)"), "diffusers": re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")}
_MIN_VERSION = re.compile(r"""^check_min_version\(\s*["']([^"']+)["']\s*\)""", re.M)


@dataclass
class Run:
    """One training process, timed from outside."""

    tool: str
    steps: int
    wall_s: float = 0.0
    peak_rss_mib: float = 0.0
    peak_gpu_mib: float | None = None
    marks: dict[int, float] = field(default_factory=dict)  # step -> seconds since start, from progress output


def main() -> None:
    args = parse_args()
    if args.backbone:
        check_vae_factor(args.backbone)  # before anything slow
    work = Path(args.workdir or tempfile.mkdtemp(prefix="synthmed-vs-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = benchmark(args, work)
    finally:
        if not (args.keep or args.workdir):  # a folder the user named is never removed
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusers-script", type=Path, required=True, help="diffusers' examples/controlnet/train_controlnet.py")
    ap.add_argument("--data", type=Path, help="a prepared data set (default: phantom histology at --resolution, 56 train tiles)")
    ap.add_argument("--backbone", type=Path, help="a diffusers SD folder whose VAE downsamples by 8")
    ap.add_argument("--random-preset", default=None, help="build this preset (sd15, sd21, sd21-base) with random weights; "
                    "the default when --backbone is not given is sd15")
    ap.add_argument("--resolution", type=int, help="training size (default: the data's, else 64); the data's images must have it")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, nargs=2, default=(2, 6), metavar=("N1", "N2"), help="the two step counts (default 2 6; a GPU: 10 30)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the four runs; wall times are the median (default 1)")
    ap.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--xformers", action="store_true", help="xFormers attention on both sides (default: PyTorch SDPA on both)")
    ap.add_argument("--set-grads-to-none", action="store_true", help="diffusers: --set_grads_to_none (synthmed always does)")
    ap.add_argument("--synthmed-set", action="append", default=[], metavar="KEY=VALUE", help="extra `synthmed train controlnet --set`")
    ap.add_argument("--diffusers-arg", action="append", default=[], metavar="ARG", help="extra argument to diffusers' script, e.g. --diffusers-arg=--use_8bit_adam")
    ap.add_argument("--python", default=sys.executable, help="interpreter for both tools (default: this one)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per training process")
    ap.add_argument("--workdir", type=Path, help="where data, backbone, outputs and logs go (kept; default: a temporary folder, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder with every run's outputs (default: only the logs are kept in a named --workdir)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    n1, n2 = args.steps
    if not 1 <= n1 < n2:
        ap.error(f"--steps expects 1 <= N1 < N2, but got {n1} {n2}")
    if args.repeats < 1:
        ap.error(f"--repeats expects a positive int, but got {args.repeats}")
    if args.batch_size < 1:
        ap.error(f"--batch-size expects a positive int, but got {args.batch_size}")
    if args.backbone and args.random_preset:
        ap.error("--backbone and --random-preset exclude each other")
    if not args.diffusers_script.is_file():
        ap.error(f"--diffusers-script {args.diffusers_script}: not found (see the download command in --help)")
    return args


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    load_before = load_average()
    env = child_env()
    probe = probe_environment(args.python, env)
    script, script_note = diffusers_script(args.diffusers_script, probe["diffusers"], work)
    data, resolution = prepared_data(args, work, env)
    backbone, backbone_note = backbone_folder(args, work, env, resolution)
    ddata = diffusers_layout(data, work / "diffusers-data")
    n1, n2 = args.steps
    runs: dict[tuple[str, int], list[Run]] = {}
    for rep in range(1, args.repeats + 1):
        for steps in (n1, n2):
            for tool in ("synthmed", "diffusers"):
                name = f"{tool}-{steps}" + (f"-r{rep}" if args.repeats > 1 else "")
                cmd = (synthmed_command(args, data, backbone, work / f"out-{name}", steps) if tool == "synthmed" else
                       diffusers_command(args, script, ddata, backbone, work / f"out-{name}", steps, resolution, work / f"cache-{name}"))
                print(f"running {name} ...", file=sys.stderr, flush=True)
                settle(backbone)
                runs.setdefault((tool, steps), []).append(run_timed(tool, steps, cmd, env, work / f"{name}.log", args.timeout, probe["cuda"]))
                if not args.keep:
                    shutil.rmtree(work / f"out-{name}", ignore_errors=True)  # GBs of weights and optimiser state
    summary = summarise(runs, args, probe, resolution)
    print_report(summary, args, probe, script_note, backbone_note, data, ddata, resolution, work, load_before)
    return summary | {"load_before": load_before, "script": script_note, "backbone": backbone_note, "data": str(data), "resolution": resolution, "probe": probe}


def child_env() -> dict:
    """Offline, unbuffered, synthmed's plain progress lines; nothing of the user's settings is removed."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SYNTHMED_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}


def probe_environment(python: str, env: dict) -> dict:
    """Versions and device, from a child (which also warms the imports for the timed runs)."""
    proc = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(f"error: diffusers' train_controlnet.py needs `datasets` and `torchvision` (built for this torch), and synthmed must "
                 f"be importable; `{python}` failed to import them:\n  {last}\ninstall them with: {python} -m pip install datasets torchvision")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def diffusers_script(path: Path, installed: str, work: Path) -> tuple[Path, str]:
    """The script to run (a patched temporary copy only if it demands a newer diffusers) and what was done."""
    from packaging.version import Version

    raw = path.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()  # = `git hash-object`, comparable with a tag's tree
    ident = f"{path} (git blob {blob}, sha256 {hashlib.sha256(raw).hexdigest()[:16]}...)"
    text = raw.decode("utf-8")
    found = _MIN_VERSION.search(text)
    if found is None:
        return path, f"{ident}; no check_min_version line; run unmodified"
    wanted = found.group(1)
    if Version(installed) >= Version(wanted):
        return path, f"{ident}; check_min_version(\"{wanted}\") <= installed {installed}: run unmodified"
    patched = work / "train_controlnet_patched.py"
    patched.write_text(text[:found.start()] + f"# {found.group(0)}  # disabled by benchmarks/train_vs_diffusers.py" + text[found.end():])
    return patched, (f"{ident}; PATCHED: it demands diffusers >= {wanted} but {installed} is installed, so its one "
                     f"check_min_version line is commented out in a temporary copy ({patched.name}); nothing else changed")


def prepared_data(args: argparse.Namespace, work: Path, env: dict) -> tuple[Path, int]:
    """The prepared data set and its (square) image size, which is the training resolution."""
    data = args.data
    if data is None:
        data = make_phantom(args.python, env, work, args.resolution or 64)
    rows = read_rows(data / "train" / "metadata.jsonl")
    size = image_size(data / "train" / rows[0]["file_name"])
    if size[0] != size[1]:
        sys.exit(f"error: {data}: images are {size[0]}x{size[1]}; diffusers' script trains on square crops, so use square images")
    if args.resolution and args.resolution != size[0]:
        sys.exit(f"error: --resolution {args.resolution}, but {data}'s images are {size[0]} px (synthmed trains at the data's size): "
                 "prepare the data at that size or leave --resolution out")
    bad = [r["conditioning_image"] for r in rows if Path(r.get("conditioning_image", "x.npy")).suffix.lower() not in (".png", ".jpg", ".jpeg")]
    if bad:
        sys.exit(f"error: {data}: conditioning {bad[0]!r} is not a PNG/JPEG file (or is missing); diffusers' script reads conditioning images only")
    return data, size[0]


def make_phantom(python: str, env: dict, work: Path, resolution: int) -> Path:
    """Phantom histology tiles (56 train) at `resolution`; above 256 px, the 256 px tiles resized by `prepare diffusers`."""
    base = 256 if resolution > 256 else resolution
    if base not in (64, 128, 256):
        sys.exit(f"error: --resolution expects 64, 128, 256 or more than 256 for the phantom data, but got {resolution}")
    out = work / f"phantom-{base}"
    cli([python, "-m", "synthmed.cli", "prepare", "phantom-histology", "--out", str(out), "--size", str(base),
         "--slides", "9", "--tiles-per-slide", "8", "--unlabelled-slides", "0"], env, "prepare phantom data")
    if base == resolution:
        return out
    resized = work / f"phantom-{resolution}"
    cli([python, "-m", "synthmed.cli", "prepare", "diffusers", "--root", str(out), "--out", str(resized), "--size", str(resolution)],
        env, f"resize the phantom data to {resolution} px")
    return resized


def backbone_folder(args: argparse.Namespace, work: Path, env: dict, resolution: int) -> tuple[Path, str]:
    """The backbone folder both tools load, checked to downsample by 8."""
    if args.backbone:
        folder, note = args.backbone.resolve(), f"{args.backbone.resolve()}"
    else:
        preset = args.random_preset or "sd15"
        folder = work / f"backbone-{preset}-random"
        cli([args.python, "-c", _BUILD, preset, str(resolution), str(folder)], env, f"build the {preset} backbone (random weights)")
        note = f"{preset} architecture, random weights (seed 0), built for {resolution} px in {folder}"
    check_vae_factor(folder)
    return folder, note


def check_vae_factor(folder: Path) -> None:
    """diffusers' script only works with a VAE that downsamples by 8."""
    config = folder / "vae" / "config.json"
    if not config.is_file():
        sys.exit(f"error: {folder}: not a diffusers SD folder (no vae/config.json)")
    factor = 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)
    if factor != 8:
        sys.exit(f"error: {folder}: the VAE downsamples by {factor}; diffusers' train_controlnet.py builds ControlNetModel.from_unet(unet) "
                 "with conditioning_embedding_out_channels (16, 32, 96, 256), which downsamples the conditioning image by 8, so its "
                 "latents and conditioning features differ in size (synthmed's tiny preset is such a backbone); use an SD folder or --random-preset")


def diffusers_layout(data: Path, out: Path) -> Path:
    """A copy of the train split with only the script's three columns (`file_name`, `conditioning_image_file_name`,
    `text`: `datasets` decodes the first two as images), so its other splits and nested provenance fields stay out
    of the timed run. Files are hard links (copies across file systems)."""
    src = data / "train"
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in read_rows(src / "metadata.jsonl"):
        for key in ("file_name", "conditioning_image"):
            link(src / row[key], out / row[key])
        lines.append(json.dumps({"file_name": row["file_name"], "conditioning_image_file_name": row["conditioning_image"], "text": row["text"]}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def synthmed_command(args, data: Path, backbone: Path, out: Path, steps: int) -> list[str]:
    sets = ["log_with=null", "checkpoint_every=100000", f"attention={'xformers' if args.xformers else 'sdpa'}"]
    sets += ["gradient_checkpointing=true"] if args.gradient_checkpointing else []
    cmd = [args.python, "-m", "synthmed.cli", "train", "controlnet", "--data", str(data), "--out", str(out), "--backbone", str(backbone),
           "--steps", str(steps), "--batch-size", str(args.batch_size), "--lr", "1e-5", "--seed", "0", "--mixed-precision", args.mixed_precision]
    return cmd + [x for s in sets + args.synthmed_set for x in ("--set", s)]


def diffusers_command(args, script: Path, ddata: Path, backbone: Path, out: Path, steps: int, resolution: int, cache: Path) -> list[str]:
    cmd = [args.python, str(script), "--pretrained_model_name_or_path", str(backbone), "--output_dir", str(out),
           "--train_data_dir", str(ddata), "--image_column", "image", "--conditioning_image_column", "conditioning_image",
           "--caption_column", "text", "--resolution", str(resolution), "--train_batch_size", str(args.batch_size),
           "--max_train_steps", str(steps), "--learning_rate", "1e-5", "--mixed_precision", args.mixed_precision,
           "--checkpointing_steps", "100000", "--dataloader_num_workers", "0", "--seed", "0",
           "--cache_dir", str(cache)]  # a fresh datasets cache per run, so both runs build it (it cancels out)
    cmd += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--enable_xformers_memory_efficient_attention"] if args.xformers else []
    cmd += ["--set_grads_to_none"] if args.set_grads_to_none else []
    return cmd + args.diffusers_arg


def run_timed(tool: str, steps: int, cmd: list[str], env: dict, log: Path, timeout: float, cuda: bool) -> Run:
    """Run one training process; wall time, peak RSS (wait4), peak GPU memory (nvidia-smi) and progress marks."""
    run = Run(tool, steps)
    gpu = GpuPoller() if cuda else None
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.PIPE)
        reader = threading.Thread(target=read_progress, args=(proc.stderr, fh, _PROGRESS[tool], run.marks, start))
        reader.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss is its peak RSS (KiB on Linux)
        run.wall_s = time.perf_counter() - start
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
    run.peak_rss_mib = usage.ru_maxrss / 1024
    if gpu is not None:
        run.peak_gpu_mib = gpu.stop()
    if proc.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        sys.exit(f"error: {tool} ({steps} steps) exited with {proc.returncode}; last lines of {log}:\n{tail}")
    return run


def read_progress(stream, log, pattern: re.Pattern, marks: dict[int, float], start: float) -> None:
    """Copy stderr to the log with elapsed times, noting when each step count first appears (tqdm separates updates by \\r)."""
    buf = b""
    while chunk := stream.read1(65536):
        now = time.perf_counter() - start
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        for part in filter(None, (p.decode("utf-8", "replace") for p in parts)):
            log.write(f"[{now:8.2f}s] {part}\n")
            if m := pattern.search(part):
                marks.setdefault(int(m.group(1)), now)
    log.write(buf.decode("utf-8", "replace"))
    log.flush()


class GpuPoller:
    """Peak of `nvidia-smi --query-gpu=memory.used` for the first visible GPU, minus its value before the run."""

    def __init__(self):
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index]
        self.base = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[0])
        self.peak = self.base
        self.proc = subprocess.Popen(cmd + ["-lms", "100"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self.peak = max(self.peak, float(line.split()[0]))

    def stop(self) -> float:
        self.proc.terminate()
        self.thread.join()
        return self.peak - self.base


def summarise(runs: dict, args, probe: dict, resolution: int) -> dict:
    """img/s from the step difference, the one-off cost, in-run img/s, peak memory, ratios."""
    n1, n2 = args.steps
    b = args.batch_size
    out = {"settings": {"batch_size": b, "steps": [n1, n2], "resolution": resolution, "mixed_precision": args.mixed_precision,
                        "gradient_checkpointing": args.gradient_checkpointing, "attention": "xformers" if args.xformers else "sdpa"}}
    for tool in ("synthmed", "diffusers"):
        t1, t2 = (statistics.median(r.wall_s for r in runs[tool, n]) for n in (n1, n2))
        img_s = (n2 - n1) * b / (t2 - t1) if t2 > t1 else float("nan")
        in_run = [x for r in runs[tool, n2] if (x := in_run_rate(r.marks, n2, b)) is not None]
        every = runs[tool, n1] + runs[tool, n2]
        out[tool] = {"wall_s": [t1, t2], "wall_s_all": {n: [r.wall_s for r in runs[tool, n]] for n in (n1, n2)},
                     "img_s": img_s, "one_off_s": t1 - n1 * b / img_s, "in_run_img_s": statistics.median(in_run) if in_run else None,
                     "peak_rss_mib": max(r.peak_rss_mib for r in every),
                     "peak_gpu_mib": max(r.peak_gpu_mib for r in every) if probe["cuda"] else None}
    s, d = out["synthmed"], out["diffusers"]
    mem = "peak_gpu_mib" if probe["cuda"] else "peak_rss_mib"
    out["ratio"] = {"img_s": s["img_s"] / d["img_s"], "peak_memory": s[mem] / d[mem], "memory_measure": mem,
                    "in_run_img_s": s["in_run_img_s"] / d["in_run_img_s"] if s["in_run_img_s"] and d["in_run_img_s"] else None}
    return out


def in_run_rate(marks: dict[int, float], steps: int, batch: int) -> float | None:
    """img/s between the first and the last progress mark before the final step (which may include saving)."""
    ks = sorted(k for k in marks if 1 <= k < steps)
    if len(ks) < 2 or marks[ks[-1]] <= marks[ks[0]]:
        return None
    return (ks[-1] - ks[0]) * batch / (marks[ks[-1]] - marks[ks[0]])


def print_report(s: dict, args, probe: dict, script_note: str, backbone_note: str, data: Path, ddata: Path, resolution: int, work: Path, load_before: str) -> None:
    n1, n2 = args.steps
    st = s["settings"]
    dev = f"{probe['device']} (CUDA)" if probe["cuda"] else f"cpu, {probe['threads']} torch threads"
    n_train = len(read_rows(data / "train" / "metadata.jsonl"))
    print("\nsynthmed vs diffusers train_controlnet.py: ControlNet training throughput")
    print(f"  device            {dev}; torch {probe['torch']}, diffusers {probe['diffusers']}, datasets {probe['datasets']}"
          f"\n                    load average {load_before} before, {load_average()} after (1, 5, 15 min)")
    print(f"  backbone          {backbone_note}")
    print(f"  data              {data} train split: {n_train} images {resolution}x{resolution}, their conditioning images and captions"
          f"\n                    (diffusers reads a hard-linked copy, {ddata.name}/, with conditioning_image as an image column)")
    print(f"  settings          batch {st['batch_size']}, steps {n1} and {n2}, lr 1e-5, mixed precision {st['mixed_precision']}, "
          f"attention {st['attention']}, gradient checkpointing {'on' if st['gradient_checkpointing'] else 'off'}"
          + (f", synthmed extra {args.synthmed_set}" if args.synthmed_set else "") + (f", diffusers extra {args.diffusers_arg}" if args.diffusers_arg else ""))
    print(f"  diffusers script  {script_note}")
    med = f", median of {args.repeats}" if args.repeats > 1 else ""
    rows = [(f"wall time, {n1} steps (s{med})", lambda t: f"{t['wall_s'][0]:.1f}"),
            (f"wall time, {n2} steps (s{med})", lambda t: f"{t['wall_s'][1]:.1f}"),
            (f"img/s  ({n2}-{n1} steps x {st['batch_size']} / time difference)", lambda t: f"{t['img_s']:.3f}"),
            ("one-off s (start, load, data, save)", lambda t: f"{t['one_off_s']:.1f}"),
            (f"in-run img/s (progress marks, {n2}-step run)", lambda t: "n/a" if t["in_run_img_s"] is None else f"{t['in_run_img_s']:.3f}"),
            ("peak RSS of the process (MiB)", lambda t: f"{t['peak_rss_mib']:.0f}")]
    if probe["cuda"]:
        rows.append(("peak GPU memory.used - before (MiB)", lambda t: f"{t['peak_gpu_mib']:.0f}"))
    print(f"\n  {'':52s}{'synthmed':>12s}{'diffusers':>12s}")
    for label, fmt in rows:
        print(f"  {label:52s}{fmt(s['synthmed']):>12s}{fmt(s['diffusers']):>12s}")
    r = s["ratio"]
    what = "GPU memory.used" if probe["cuda"] else "peak RSS"
    in_run = "n/a" if r["in_run_img_s"] is None else f"x{r['in_run_img_s']:.2f}"
    print(f"\n  synthmed / diffusers: img/s x{r['img_s']:.2f} (in-run {in_run}), {what} x{r['peak_memory']:.2f}")
    noisy = [t for t in ("synthmed", "diffusers") if s[t]["in_run_img_s"] and not 0.85 < s[t]["img_s"] / s[t]["in_run_img_s"] < 1.15]
    if noisy:
        print(f"  NOTE: for {' and '.join(noisy)} the two img/s estimates differ by more than 15%: the machine was noisy "
              "(other load, memory faults); rerun with --repeats 3 and/or more steps")
    print("  one-off: synthmed's includes VAE-encoding every train image in each flip/rotation view and its resumable checkpoint\n"
          "  at the last step (trainable weights + AdamW state); diffusers' its datasets cache (fresh per run).")
    print("  Compare only figures from one run on one machine." + (f" Logs: {work}" if args.keep or args.workdir else ""))


def cli(cmd: list[str], env: dict, what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: could not {what}:\n{proc.stderr[-3000:]}")


def read_rows(path: Path) -> list[dict]:
    """A prepared split's rows with synthmed's in-memory column names (either metadata layout)."""
    from synthmed.data.metadata import read_metadata

    if not path.is_file():
        sys.exit(f"error: {path}: not found (--data expects a prepared data set with a train split)")
    return read_metadata(path)


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def settle(backbone: Path) -> None:
    """Before each timed run: flush what earlier runs wrote (else the next run pays for it) and read
    the backbone into the page cache (else whichever run comes after a large write pays for a cold disk)."""
    os.sync()
    for p in backbone.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()

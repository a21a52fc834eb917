"""Benchmark `synthmed prepare`: images/s and peak RSS per format, on fixtures at real image sizes.

    python benchmarks/prepare.py                      # every format, scale="real" fixtures
    python benchmarks/prepare.py --formats pannuke --pannuke-patches 800
    python benchmarks/prepare.py --workers 1 2 --json out.json

Each format's fixture is written by synthmed.testing.<format>.write(root, scale="real") into a
temporary folder (removed afterwards); `prepare` then runs in a fresh interpreter so that its
peak RSS (the main process and the largest worker, from getrusage) is its own. Figures are
only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIXTURES = {
    "medmnist": ("medmnist", {"flag": "pathmnist"}),
    "pannuke": ("pannuke", {}),
    "bci": ("bci", {}),
    "pcam": ("pcam", {}),
    "camelyon": ("camelyon", {}),
    "acdc": ("acdc", {}),
    "brats": ("brats", {}),
    "busi": ("busi", {}),
    "cbis-ddsm": ("cbis_ddsm", {}),
    "folder": ("folder", {}),
    "manifest": ("manifest", {}),
    "diffusers": ("diffusers_layout", {}),
}

# Both jobs run in fresh interpreters: Linux carries a parent's peak RSS (ru_maxrss) into a
# forked child, so the benchmark process itself stays small and the child reads VmHWM (reset
# by exec) for its own peak; workers' peak comes from getrusage(RUSAGE_CHILDREN).
_PREPARE = """
import json, resource, sys, time
from pathlib import Path
from synthmed import pipelines
from synthmed.config import PrepareConfig
cfg = PrepareConfig.model_validate(json.loads(sys.argv[1]))
t = time.perf_counter()
card = pipelines.prepare(cfg, Path(sys.argv[2]))
secs = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": secs, "n": sum(s["n"] for s in card["splits"].values()), "rss_main_mb": hwm / 1024,
                  "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""
_WRITE = """
import json, sys
from pathlib import Path
import importlib
module, kwargs = sys.argv[1], json.loads(sys.argv[3])
importlib.import_module(f"synthmed.testing.{module}").write(Path(sys.argv[2]), scale="real", **kwargs)
"""


def write_fixture(fmt: str, root: Path, pannuke_patches: int | None) -> tuple[dict, float]:
    module, options = FIXTURES[fmt]
    kwargs = {"n_per_fold": pannuke_patches, "folds": [1]} if fmt == "pannuke" and pannuke_patches else {}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRITE, module, str(root), json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{fmt}: writing the fixture failed:\n{proc.stderr[-2000:]}")
    return options, time.perf_counter() - t


def run_prepare(fmt: str, root: Path, out: Path, options: dict, workers: int) -> dict:
    cfg = {"source": fmt, "root": str(root), "options": options, "workers": workers}
    env = dict(os.environ, SYNTHMED_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-c", _PREPARE, json.dumps(cfg), str(out)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{fmt}: prepare failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="*", default=list(FIXTURES))
    ap.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--pannuke-patches", type=int, default=None, help="pannuke fold fixture size (800 = about 2.5 GB masks.npy)")
    ap.add_argument("--tmp", type=Path, default=None, help="where fixtures are written (needs free disk)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    print(f"{'format':<11} {'workers':>7} {'images':>7} {'seconds':>8} {'images/s':>9} {'RSS main MB':>12} {'RSS worker MB':>14}")
    for fmt in args.formats:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-{fmt}-", dir=args.tmp))
        try:
            options, write_s = write_fixture(fmt, tmp / "src", args.pannuke_patches)
            for w in args.workers:
                r = run_prepare(fmt, tmp / "src", tmp / f"out-{w}", options, w)
                r.update(format=fmt, workers=w, images_per_s=r["n"] / r["seconds"], fixture_write_s=write_s)
                rows.append(r)
                print(f"{fmt:<11} {w:>7} {r['n']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>9.1f} {r['rss_main_mb']:>12.0f} {r['rss_worker_mb']:>14.0f}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU check in one call, printed as one table. WALL TIME: at most 8 minutes on one H100/H200
# (each step below runs in fresh processes under its own `timeout`; the limits add up to 7.5 min).
#
#   benchmarks/gpu_check.sh [--diffusers-script PATH] [--out DIR] [--tiny]
#
# On sd15's architecture with random weights at 512 px (nothing is downloaded):
#   train     synthmed training img/s, bf16, batch 8, cached latents; one step's FLOPs (torch.utils.flop_counter)
#             and the model FLOP utilisation against the device's dense peak (benchmarks/train.py --flops);
#             with --diffusers-script (diffusers' examples/controlnet/train_controlnet.py, which the user fetches:
#             it stays out of this project), diffusers' img/s in the same call (benchmarks/train_vs_diffusers.py)
#   memory    batch 1, gradient checkpointing, bf16: peak GPU memory (torch.cuda.max_memory_allocated)
#   generate  img/s at 512 px, fp16, batch 8, 20 steps: synthmed's sampler vs the plain
#             StableDiffusionControlNetPipeline with the same weights, steps and batch (benchmarks/generate.py)
# Goals: training >= 1.5x diffusers' img/s; batch 1 at 512 px under 12 GB; generation >= 1.3x the pipeline.
# --tiny: the same steps on the tiny preset at 64 px, a few steps each, on whatever device there is (the CPU
# test runs this; its figures say nothing about a GPU). The JSON of every step and the table stay in --out.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The interpreter: $PYTHON, else the project's .venv (what `make` sets up), else python3 on the PATH.
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x "$HERE/../.venv/bin/python" ]; then PY="$HERE/../.venv/bin/python"; else PY=python3; fi
OUT="gpu-check-$(date +%Y%m%d-%H%M%S)"
SCRIPT=""
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --diffusers-script) SCRIPT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "error: gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$SCRIPT" ] && [ ! -f "$SCRIPT" ]; then
  echo "error: $SCRIPT: diffusers' train_controlnet.py not found" >&2; exit 2
fi
mkdir -p "$OUT"

if [ "$TINY" = 1 ]; then
  MODEL=(--backbone tiny --weights random --resolution 64); PRESET=tiny; PREC=no; GEN_PREC=fp32
  TRAIN=(--batch-size 4 --steps 2 --warmup 1 --n-images 8); MEM=(--batch-size 1 --steps 1 --warmup 1 --n-images 4)
  GEN=(--batch-size 2 --n-images 2 --steps 2 --repeats 1); VS=(--batch-size 2 --steps 1 2); T=(300 300 300 300)
else
  MODEL=(--backbone sd15 --weights random --resolution 512); PRESET=sd15; PREC=bf16; GEN_PREC=fp16
  TRAIN=(--batch-size 8 --steps 20 --warmup 3 --n-images 64); MEM=(--batch-size 1 --steps 3 --warmup 1 --n-images 8)
  GEN=(--batch-size 8 --n-images 16 --steps 20 --repeats 2); VS=(--batch-size 8 --steps 5 15); T=(120 210 60 60)
fi

step() {  # name, limit in seconds, command...: a failed or timed-out step is a row of the table, not the end of the check
  local name="$1" limit="$2"; shift 2
  echo "== $name (at most ${limit}s)" >&2
  local rc=0
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    echo "   $name did not finish (exit $rc$([ "$rc" = 124 ] && echo ': timed out'); see $OUT/$name.log)" >&2
  fi
}

step train "${T[2]}" "$PY" "$HERE/train.py" "${MODEL[@]}" "${TRAIN[@]}" --mixed-precision "$PREC" --variants cached --flops --json "$OUT/train.json"
step memory "${T[3]}" "$PY" "$HERE/train.py" "${MODEL[@]}" "${MEM[@]}" --mixed-precision "$PREC" --gradient-checkpointing --variants cached --json "$OUT/memory.json"
step generate "${T[3]}" "$PY" "$HERE/generate.py" "${MODEL[@]}" "${GEN[@]}" --precision "$GEN_PREC" --variants synthmed --json "$OUT/generate.json"
if [ -n "$SCRIPT" ]; then
  step vs_diffusers "${T[1]}" "$PY" "$HERE/train_vs_diffusers.py" --diffusers-script "$SCRIPT" --random-preset "$PRESET" \
       --resolution "${MODEL[5]}" "${VS[@]}" --mixed-precision "$PREC" --json "$OUT/vs_diffusers.json"
fi

"$PY" - "$OUT" "$TINY" <<'EOF' | tee "$OUT/table.txt"
import json, sys
from pathlib import Path

out, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None
def row(what, value, goal="", met=None):
    flag = "" if met is None else ("met" if met else "NOT met")
    print(f"| {what} | {value} | {goal} | {flag} |")

train, memory, gen, vs = load("train"), load("memory"), load("generate"), load("vs_diffusers")
device = (gen or {}).get("device") or next((r["device"] for j in (train, memory) if j for r in j["rows"]), "?")
print(f"GPU check ({'tiny preset, 64 px: a smoke run, not a measurement' if tiny else 'sd15 architecture, random weights, 512 px'}) on {device}\n")
print("| measure | value | goal | |\n| --- | --- | --- | --- |")
t = train["rows"][0] if train and train["rows"] else None
row("training img/s (synthmed, batch 8, bf16)" if not tiny else "training img/s (synthmed)", f"{t['img_s']:.2f}" if t else "n/a (did not run)")
if vs and "ratio" in vs:
    d = vs.get("diffusers", {}).get("img_s")
    row("training img/s (diffusers' train_controlnet.py, same call)", f"{d:.2f}" if d else "n/a")
    row("training speed, synthmed / diffusers", f"{vs['ratio']['img_s']:.2f}x", ">= 1.5x", vs["ratio"]["img_s"] >= 1.5)
else:
    row("training speed, synthmed / diffusers", "n/a (no --diffusers-script given)", ">= 1.5x")
if t and t.get("flops_per_step"):
    row("FLOPs per training step (forward + backward)", f"{t['flops_per_step'] / 1e12:.3g} TFLOP")
    row("achieved TFLOP/s", f"{t['tflops']:.3g}")
    row("model FLOP utilisation", f"{100 * t['mfu']:.1f}% of {t['peak_tflops']:.0f} TFLOP/s" if t.get("mfu") is not None else "n/a (no known peak for this device)")
m = memory["rows"][0] if memory and memory["rows"] else None
row("peak memory, batch 1, gradient checkpointing", f"{m['peak_mb'] / 1024:.2f} GB" if m else "n/a (did not run)", "< 12 GB",
    None if (m is None or tiny) else m["peak_mb"] / 1024 < 12)
g = {r["variant"]: r for r in gen["rows"]} if gen else {}
if "synthmed" in g:
    row("generation img/s: synthmed / plain pipeline", f"{g['synthmed']['img_s']:.2f} / {g['pipeline']['img_s']:.2f} = {g['synthmed']['ratio']:.2f}x",
        ">= 1.3x", None if tiny else g["synthmed"]["ratio"] >= 1.3)
else:
    row("generation img/s: synthmed / plain pipeline", "n/a (did not run)", ">= 1.3x")
EOF

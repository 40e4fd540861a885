#!/usr/bin/env bash
# The GPU benchmark: Detectax against torchvision (AMP) on one GPU, in one command.
#
# On the accelerator machine (its image has jax with CUDA, flax, optax, orbax, absl-py,
# numpy, pillow, torch and torchvision, but not ml_collections), from the repo root:
#
#   1. Once, here, download the one wheel it lacks into an ignored folder (76 KB):
#        echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: -d .whl 'ml_collections>=1.0'
#   2. Run, carrying that folder:
#        run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#      Tables go to stdout and, when $OUT is set, to $OUT/gpu_benchmarks.md (and each run's
#      JSON line to $OUT/gpu_benchmarks.jsonl).
#
# What it runs (each a `python -m benchmarks.benchmark` command, printed before it runs):
#   - R50-FPN training, batch 8 at 1024x1024, bfloat16 (torchvision under torch.autocast bf16);
#   - R50-FPN inference, float32, batch 1 at 800x1216 (torchvision in float32);
#   - ViTDet-B training, batch 4 at 1024x1024, bfloat16, when configs/maskrcnn_vitdet_b_100ep_coco.py
#     exists (Detectax alone: torchvision has no ViTDet; Detectron2 publishes 0.314 s/image on an A100);
#   - the compiled memory of a ViTDet-B training step, 1 image at 1024x1024, bfloat16, with and
#     without backbone.remat (`python -m benchmarks.memory_analysis`, compiled, nothing run; against
#     Detectron2's published 10.9 GB per image).
# Each table has images/s, compile time, peak device memory, XLA's FLOPs per step and the achieved
# rate against the GPU's dense bfloat16 peak (989 TFLOP/s for an H100 or H200 SXM).
#
# Sized for under 8 minutes on an H100: compilation dominates (allow about 1.5 min for each
# training step and 1 min for inference, torchvision's start included); the timed steps are
# few: R50-FPN training at MLPerf's 180 images/s per H100 takes 0.05 s per batch of 8
# (torchvision a few times that), 3 + 10 steps a side; ViTDet-B at Detectron2's 0.314 s/image
# (A100) takes at most 1.3 s per batch of 4, 2 + 6 steps. Every benchmark has its own time
# limit (GPU_CHECK_LIMIT_S, default 200 s), so one that hangs cannot take the others' time.
#
# GPU_CHECK_TINY=1 runs the same commands on the tiny test config (64x64, a few steps), on any
# machine, with or without torch: the check that the script and its imports work, run by
# tests/test_gpu_check.py with TensorFlow, TFDS, clu, pycocotools and imgviz blocked.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if compgen -G '.whl/*.whl' > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu_check_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# torchvision runs in a second process on the same GPU: JAX must not take 75% of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2

out_dir=${OUT:-$(mktemp -d)}
report=$out_dir/gpu_benchmarks.md
json=$out_dir/gpu_benchmarks.jsonl
limit=${GPU_CHECK_LIMIT_S:-200}
: > "$report"; : > "$json"

# torchvision's interpreter: TORCHVISION_PYTHON, else this one if it has torchvision.
tv=${TORCHVISION_PYTHON:-}
if [ -z "$tv" ] && "$PY" -c 'import torch, torchvision' 2> /dev/null; then tv=$PY; fi

echo "== devices"
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' || exit 1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
peak=$("$PY" -c '
import jax
kind = jax.devices()[0].device_kind
# Dense bfloat16 tensor-core peaks (NVIDIA data sheets, SXM parts).
peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
print(next((str(v) for k, v in peaks.items() if k in kind), ""))')
echo "torchvision: ${tv:-not available (Detectax alone)}; peak: ${peak:-measured matmul rate}"

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  r50=tests/tiny_shapes_config.py; vitdet=configs/demo_shapes_vitdet.py
  train_size=(--height=64 --width=64 --batch=2); infer_size=(--height=64 --width=64 --batch=1)
  vit_size=(--height=64 --width=64 --batch=2); steps=(--warmup=0 --steps=1); vit_steps=("${steps[@]}")
  mem_size=(--height=64 --width=64 --batch=1 --num_classes=3)
  extra=(--num_classes=3)
  # A check of the path, not a measurement: skip timing a 2048^3 matmul for the peak
  # (slow in bfloat16 where XLA's CPU convolutions and matmuls run without oneDNN).
  peak=${peak:-1e11}; limit=${GPU_CHECK_LIMIT_S:-600}
else
  r50=configs/maskrcnn_r50_fpn_torchvision_coco.py; vitdet=configs/maskrcnn_vitdet_b_100ep_coco.py
  train_size=(--height=1024 --width=1024 --batch=8); infer_size=(--height=800 --width=1216 --batch=1)
  vit_size=(--height=1024 --width=1024 --batch=4); steps=(--warmup=3 --steps=10)
  vit_steps=(--warmup=2 --steps=6); extra=()
  mem_size=(--height=1024 --width=1024 --batch=1)
fi

failed=0
bench() {  # bench NAME ARGS...: one benchmark command, its table appended to the report.
  local name=$1; shift
  local args=("$@" "${extra[@]}" --append="$report")
  [ -n "$peak" ] && args+=(--peak_flops="$peak")
  echo "== $name"
  echo "$PY -m benchmarks.benchmark ${args[*]}"
  local log; log=$(mktemp)
  timeout "$limit" "$PY" -m benchmarks.benchmark "${args[@]}" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (exit $rc${limit:+, limit ${limit}s})"
    printf '\n### %s: failed (exit %s)\n\n```\n%s\n```\n' "$name" "$rc" "$(tail -n 20 "$log")" >> "$report"
    failed=1
  else
    tail -n 1 "$log" >> "$json"
  fi
  rm -f "$log"
}

tv_args=(); [ -n "$tv" ] && tv_args=(--torchvision_python="$tv")
bench "R50-FPN training, bfloat16" --config="$r50" "${train_size[@]}" --mode=train \
  "${steps[@]}" --config.dtype=bfloat16 "${tv_args[@]}"
bench "R50-FPN inference, float32" --config="$r50" "${infer_size[@]}" --mode=inference \
  "${steps[@]}" "${tv_args[@]}"
if [ -f "$vitdet" ]; then
  bench "ViTDet-B training, bfloat16" --config="$vitdet" "${vit_size[@]}" --mode=train \
    "${vit_steps[@]}" --config.dtype=bfloat16
  for remat in False True; do
    args=(--config="$vitdet" "${mem_size[@]}" --config.dtype=bfloat16
          --config.model.backbone.remat=$remat)
    echo "== ViTDet-B training step memory, remat $remat"
    echo "$PY -m benchmarks.memory_analysis ${args[*]}"
    log=$(mktemp)
    timeout "$limit" "$PY" -m benchmarks.memory_analysis "${args[@]}" > "$log" 2>&1
    rc=$?
    grep -v '^I[0-9]' "$log"
    printf '\n### ViTDet-B training step memory, remat %s (exit %s)\n\n```\n%s\n```\n' \
      "$remat" "$rc" "$(grep -v '^I[0-9]' "$log" | tail -n 20)" >> "$report"
    [ "$rc" -ne 0 ] && failed=1
    rm -f "$log"
  done
else
  echo "== ViTDet-B: $vitdet does not exist yet; skipped" | tee -a "$report"
fi

echo "== tables ($report)"
cat "$report"
exit $failed

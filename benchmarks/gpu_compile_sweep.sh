#!/usr/bin/env bash
# torch.compile (default mode, static shapes) inference and training steps for every model on one
# GPU, ratios against DeiT-T in the same run (anchors protocol: bf16 autocast, 3 warm-ups, median of
# 10 CUDA-event-timed calls; no batch-1 latency, which would be one more compilation per row).
#   warm            compile every (model, size) once, one process per model in parallel (one untimed
#                   call each; rows in $OUT/warm, not results): fills Inductor's and AOTAutograd's
#                   caches, so that the measured run spends its time measuring, not compiling
#   measure NAME SIZE...   the recorded run at these sizes: NAME.json, .csv, .png, .log in $OUT
# Usage: OUT=dir bash benchmarks/gpu_compile_sweep.sh warm; OUT=dir bash benchmarks/gpu_compile_sweep.sh
#        measure gpu_compile_all_models 224 512 1024 2048     (the caches live while the machine does)
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
ALL=(vig_tiny vig_small vig_base vig_h_tiny castling_deit_tiny deit_tiny_patch16_224 deit_small_patch16_224 deit_base_patch16_224)
COMMON=(--device cuda --amp bf16 --compile --train --no-latency)
case "$1" in
  warm)
    mkdir -p "$OUT/warm"
    for m in "${ALL[@]}"; do
      TORCHINDUCTOR_COMPILE_THREADS=4 python3 -m vigla bench "${COMMON[@]}" --warmup 1 --iters 1 --models "$m" \
        --img-size 224 512 1024 2048 --out "$OUT/warm" --name "warm_$m" > "$OUT/warm/warm_$m.log" 2>&1 &
    done
    wait
    tail -n 2 "$OUT"/warm/*.log
    ;;
  measure)
    name=$2
    shift 2
    python3 -m vigla bench "${COMMON[@]}" --warmup 3 --iters 10 --models "${ALL[@]}" \
      --baseline deit_tiny_patch16_224 --img-size "$@" --out "$OUT" --name "$name" 2>&1 | tee "$OUT/$name.log" | tail -n 45
    plot_if_missing "$OUT/$name.json"
    ;;
  *) echo "usage: gpu_compile_sweep.sh warm | measure NAME SIZE..." >&2; exit 2 ;;
esac

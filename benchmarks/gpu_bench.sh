#!/usr/bin/env bash
# `vigla bench` on one GPU, in one call (fits ~6 minutes on one H200; each run has its own time cap):
#   1. gpu_eager_train_all_models   ViG-T/S/B, ViG-H-T, Castling-DeiT-T, DeiT-T/S/B at
#                        224/512/1024/2048: inference (batch 128/128/32/8), latency at batch 1,
#                        training steps (AdamW, bf16 autocast); ratios against DeiT-T (cap 260 s)
#   2. bench_bigla_triton  the BiGLA operator alone at every shape of bench_bigla.py (Triton only:
#                        fla-core's cold autotuning does not fit this call)         (cap 50 s)
#   3. profile_vig       torch.profiler op table of ViG-T at 224 (inference and training)
# Separately: torch.compile of every model (benchmarks/gpu_compile_sweep.sh, a call of its own);
# benchmarks/gpu_all.sh: ViG-T vs DeiT-T with CUDA graphs and ViG-T with gradient checkpointing;
# by hand: ViG-S vs DeiT-B.
# Anchors protocol: bf16 autocast, 3 warm-ups, median of 10 CUDA-event-timed calls. Models that are
# not registered (yet) are skipped with a warning. Each run writes NAME.json and NAME.csv after every
# row (so a run stopped by its cap keeps its rows), NAME.png and NAME.log.
# Usage: bash benchmarks/gpu_bench.sh [OUT_DIR]     (default: $OUT, else benchmarks/results)
set -o pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR"
source benchmarks/gpu_env.sh

ALL="vig_tiny vig_small vig_base vig_h_tiny castling_deit_tiny deit_tiny_patch16_224 deit_small_patch16_224 deit_base_patch16_224"
COMMON=(--device cuda --amp bf16 --warmup 3 --iters 10 --skip-missing --out "$OUT_DIR")

bench() {  # bench CAP_SECONDS NAME ARGS...
  local cap=$1 name=$2
  shift 2
  rm -f "$OUT_DIR/$name".{json,csv,png,log}
  echo "=== $name (cap ${cap}s): vigla bench $*"
  timeout -k 10 "$cap" python3 -m vigla bench "${COMMON[@]}" --name "$name" "$@" 2>&1 \
    | tee "$OUT_DIR/$name.log" | tail -n 45
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_bench: $name hit its ${cap}s cap; the rows measured so far are in $name.json"
  fi
  plot_if_missing "$OUT_DIR/$name.json"
}

bench 260 gpu_eager_train_all_models --models $ALL --baseline deit_tiny_patch16_224 \
  --img-size 224 512 1024 2048 --train
timeout -k 10 50 python3 benchmarks/bench_bigla.py --out "$OUT_DIR" --name bench_bigla_triton --backends triton \
  2>&1 | tee "$OUT_DIR/bench_bigla_triton.log" | tail -n 12
timeout -k 10 45 python3 benchmarks/profile_vig.py --models vig_tiny --img-size 224 --iters 2 \
  --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/profile_vig.log" | tail -n 30
ls -l "$OUT_DIR"

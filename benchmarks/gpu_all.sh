#!/usr/bin/env bash
# Everything vigla measures on a GPU, in one call (about 9 minutes on one H200; each step has its
# own time cap, so a slow step cannot take the others with it):
#   1. test_gpu         the GPU test suite (`pytest -m gpu`: kernel vs float64 on 210 random shapes,
#                       fused ops, fused model vs reference ops, torch.compile, vigla bench on CUDA)
#   2. bench_bigla      the BiGLA operator, Triton vs fla-core's chunk_gla on [x; flip(x)], bf16
#                       (fla-core autotunes from cold: at 45de212 this step used up its cap before
#                       its first row; `--backends triton` alone takes well under a minute)
#   3. gpu_eager_train  vigla bench: ViG-T vs DeiT-T at 224/512/1024/2048, inference (batch
#                       128/128/32/8), batch-1 latency, training steps (AdamW), bf16 autocast
#   4. gpu_vig_s_vs_deit_b_224   vigla bench: ViG-S vs DeiT-B at 224
#   5. profile_vig      torch.profiler op table of ViG-T at 224 (inference and training)
# Usage: OUT=dir bash benchmarks/gpu_all.sh      (optional wheels, e.g. fla-core, from .whl/)
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh

step() {  # step CAP_SECONDS NAME COMMAND...
  local cap=$1 name=$2
  shift 2
  echo "=== $name (cap ${cap}s): $*"
  timeout -k 10 "$cap" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "gpu_all: $name hit its ${cap}s cap"; fi
}
BENCH=(python3 -m vigla bench --device cuda --amp bf16 --warmup 3 --iters 10 --out "$OUT")
PLOT='import json, sys; from pathlib import Path; from vigla.bench.plot import plot_results
plot_results(json.load(open(sys.argv[1])), Path(sys.argv[2]))'

step 170 test_gpu python3 -m pytest tests -m gpu -q -p no:cacheprovider -n 16 --timeout 150 \
  -W ignore::DeprecationWarning -p no:benchmark -rfE
step 150 bench_bigla python3 benchmarks/bench_bigla.py --out "$OUT" --backends triton fla
step 130 gpu_eager_train "${BENCH[@]}" --name gpu_eager_train --models vig_tiny deit_tiny_patch16_224 \
  --baseline deit_tiny_patch16_224 --img-size 224 512 1024 2048 --train
step 45 gpu_vig_s_vs_deit_b_224 "${BENCH[@]}" --name gpu_vig_s_vs_deit_b_224 --no-latency \
  --models vig_small deit_base_patch16_224 --baseline deit_base_patch16_224 --img-size 224 --train
step 45 profile_vig python3 benchmarks/profile_vig.py --models vig_tiny --img-size 224 --iters 2 --out "$OUT"
for name in gpu_eager_train gpu_vig_s_vs_deit_b_224; do
  if [ -f "$OUT/$name.json" ] && [ ! -f "$OUT/$name.png" ]; then python3 -c "$PLOT" "$OUT/$name.json" "$OUT/$name.png"; fi
done
ls -l "$OUT"

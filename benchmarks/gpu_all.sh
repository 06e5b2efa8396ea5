#!/usr/bin/env bash
# The GPU checks of a kernel or model change, in one call (about 9 minutes on one H200; each step
# has its own time cap, so a slow step cannot take the others with it):
#   1. test_gpu         the GPU test suite (`pytest -m gpu`: kernels vs float64 on random shapes,
#                       gated and plain BiGLA, fused ops, fused model vs reference ops,
#                       torch.compile, CUDA graphs, vigla bench on CUDA)
#   2. bench_bigla_triton  the BiGLA operator at every bench_bigla.py shape, Triton only (the
#                       comparison with fla-core, whose cold autotuning takes minutes, is
#                       benchmarks/gpu_fla.sh, a call of its own)
#   3. gpu_eager_train  vigla bench: ViG-T vs DeiT-T at 224/512/1024/2048, inference (batch
#                       128/128/32/8), batch-1 latency, training steps (AdamW), bf16 autocast
#   3b. gpu_ckpt_train  the same at 512/1024/2048 with ViG-T's gradient checkpointing on
#   4. gpu_cuda_graph   the same inference as CUDA-graph replays (no CPU launch overhead)
# The wider sweep (every model, torch.compile, checkpointing, the op profile) is
# benchmarks/gpu_bench.sh; benchmarks/tune_bigla.py times the kernels' launch settings.
# Usage: OUT=dir bash benchmarks/gpu_all.sh
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh

step() {  # step CAP_SECONDS NAME COMMAND...
  local cap=$1 name=$2
  shift 2
  echo "=== $name (cap ${cap}s): $*"
  echo "# commit $VIGLA_COMMIT | $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) | $*" > "$OUT/$name.log"
  timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$OUT/$name.log" | tail -n 25
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "gpu_all: $name hit its ${cap}s cap"; fi
}
BENCH=(python3 -m vigla bench --device cuda --amp bf16 --warmup 3 --iters 10 --out "$OUT")
PAIR=(--models vig_tiny deit_tiny_patch16_224 --baseline deit_tiny_patch16_224)

step 170 test_gpu python3 -m pytest tests -m gpu -q -p no:cacheprovider -n 16 --timeout 150 \
  -W ignore::DeprecationWarning -p no:benchmark -rfE
step 60 bench_bigla_triton python3 benchmarks/bench_bigla.py --out "$OUT" --name bench_bigla_triton --backends triton
step 130 gpu_eager_train "${BENCH[@]}" --name gpu_eager_train "${PAIR[@]}" \
  --img-size 224 512 1024 2048 --train
step 100 gpu_ckpt_train "${BENCH[@]}" --name gpu_ckpt_train "${PAIR[@]}" \
  --img-size 512 1024 2048 --train --grad-checkpointing vig_tiny
step 60 gpu_cuda_graph "${BENCH[@]}" --name gpu_cuda_graph "${PAIR[@]}" \
  --img-size 224 512 1024 2048 --cuda-graph
for name in gpu_eager_train gpu_ckpt_train gpu_cuda_graph; do
  plot_if_missing "$OUT/$name.json"
done
ls -l "$OUT"

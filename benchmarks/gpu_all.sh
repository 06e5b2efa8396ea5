#!/usr/bin/env bash
# Everything vigla measures on a GPU, in one call (about 9 minutes on one H200; each step has its
# own time cap, so a slow step cannot take the others with it):
#   1. test_gpu         the GPU test suite (`pytest -m gpu`: kernel vs float64 on 210 random shapes,
#                       fused ops, fused model vs reference ops, torch.compile, vigla bench on CUDA)
#   2. bench_bigla      the BiGLA operator, Triton vs fla-core's chunk_gla on [x; flip(x)], bf16
#   3. gpu_eager_train  vigla bench: ViG-T vs DeiT-T at 224/512/1024/2048, inference (batch
#                       128/128/32/8), batch-1 latency, training steps (AdamW), bf16 autocast
#   4. gpu_vig_s_vs_deit_b_224   vigla bench: ViG-S vs DeiT-B at 224
#   5. profile_vig      torch.profiler op table of ViG-T at 224 (inference and training)
# Usage: OUT=dir bash benchmarks/gpu_all.sh      (optional wheels, e.g. fla-core, from .whl/)
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# a copied tree may carry no .git, or a stale one: name the commit, e.g. VIGLA_COMMIT=$(git rev-parse --short HEAD)
export VIGLA_COMMIT=${VIGLA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, timm, triton; print('torch', torch.__version__, '| timm', timm.__version__, '| triton', triton.__version__)"

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

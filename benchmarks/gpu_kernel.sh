#!/usr/bin/env bash
# The fused BiGLA kernel on a GPU, in one call: the GPU test suite (log) and the operator
# benchmark (JSON). Usage: OUT=dir bash benchmarks/gpu_kernel.sh [pytest -k expression]
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
timeout 280 python3 -m pytest tests/test_bigla_triton.py -m gpu -q -p no:cacheprovider -n 16 --timeout 200 \
  -W ignore::DeprecationWarning -p no:benchmark ${1:+-k "$1"} 2>&1 | tee "$OUT/test_bigla_gpu.log" | tail -30
timeout 290 python3 benchmarks/bench_bigla.py --out "$OUT" 2>&1 | tee "$OUT/bench_bigla.log" | tail -14

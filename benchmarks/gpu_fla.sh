#!/usr/bin/env bash
# The BiGLA operator against fla-core in one run (the ratios): Triton vs fla-core's
# chunk_gla on [x; flip(x)], forward and forward+backward, bf16, at the ViG-T and ViG-S layer
# shapes (bench_bigla.json). fla-core autotunes every kernel from cold, which has taken more than
# 170 s; give this its own call (cap 560 s). Needs the fla-core wheel in .whl/ (gpu_env.sh
# installs it). Usage: OUT=dir bash benchmarks/gpu_fla.sh
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 -c "import fla" || { echo "gpu_fla: fla-core is not installed (put its wheel in .whl/)" >&2; exit 2; }
timeout -k 10 560 python3 benchmarks/bench_bigla.py --out "$OUT" --backends triton fla \
  --shapes "ViG-T @224" "ViG-T @512" "ViG-T @1024" "ViG-T @2048" "ViG-S @224" 2>&1 | tee "$OUT/bench_bigla.log" | tail -n 12

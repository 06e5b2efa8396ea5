#!/usr/bin/env bash
# The fused BiGLA kernel on a GPU, in one call: the GPU test suite (log) and the operator
# benchmark (JSON). Usage: OUT=dir bash benchmarks/gpu_kernel.sh [pytest -k expression]
# Optional wheels (fla-core, einops) are taken from .whl/ when present.
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 280 python3 -m pytest tests/test_bigla_triton.py -m gpu -q -p no:cacheprovider -n 16 --timeout 200 \
  -W ignore::DeprecationWarning -p no:benchmark ${1:+-k "$1"} 2>&1 | tee "$OUT/test_bigla_gpu.log" | tail -30
timeout 290 python3 benchmarks/bench_bigla.py --out "$OUT" 2>&1 | tee "$OUT/bench_bigla.log" | tail -14

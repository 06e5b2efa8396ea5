# Sourced by the benchmarks/gpu_*.sh scripts: the environment of a run on a lent GPU machine.
# Optional wheels (fla-core, ...) are installed from .whl/ when present; the checkout goes on the
# path; VIGLA_COMMIT names the commit for the JSON files (a copied tree may have no or a stale .git).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export VIGLA_COMMIT=${VIGLA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, timm, triton; print('torch', torch.__version__, '| timm', timm.__version__, '| triton', triton.__version__)"

plot_if_missing() {  # plot_if_missing NAME.json: NAME.png from the JSON, when the run (cut by a cap) left none
  local png="${1%.json}.png"
  if [ -f "$1" ] && [ ! -f "$png" ]; then
    python3 -c 'import json, sys; from pathlib import Path; from vigla.bench.plot import plot_results
plot_results(json.load(open(sys.argv[1])), Path(sys.argv[2]))' "$1" "$png"
  fi
}

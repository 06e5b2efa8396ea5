#!/usr/bin/env bash
# vigla train eager against --cuda-graph, per-step losses side by side: ViG-T, bf16, 224 px, batch 128, the first
# 30 steps (Fashion-MNIST resized), with and without --deterministic. One line of losses per run.
#   bash benchmarks/train_loss_match.sh /usr/share/datasets/fashion-mnist [OUT_DIR]
set -euo pipefail
FMNIST=${1:?usage: train_loss_match.sh FMNIST_DIR [OUT_DIR]}
OUT=${2:-$(mktemp -d)}
for run in eager graph eagerdet graphdet; do
  flags=()
  case $run in graph*) flags+=(--cuda-graph) ;; esac
  case $run in *det) flags+=(--deterministic) ;; esac
  python -m vigla train --fmnist-dir "$FMNIST" --device cuda --img-size 224 --batch-size 128 --epochs 1 \
    --warmup-epochs 0.5 --train-subset 3840 --val-subset 256 --test-subset 256 --log-interval 1 \
    --out "$OUT/$run" "${flags[@]}" > "$OUT/$run.log" 2>&1 || { tail -3 "$OUT/$run.log"; exit 1; }
  echo "$run: $(python -c "import csv, sys; rows = list(csv.DictReader(open(sys.argv[1])));
print(' '.join(f\"{float(r['loss']):.5f}\" for r in rows))" "$OUT/$run/steps.csv")"
done

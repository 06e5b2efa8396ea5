#!/usr/bin/env bash
# Everything vigla needs on a fresh Debian/Ubuntu machine: the embedded default data
# (Fashion-MNIST, Debian package dataset-fashion-mnist) and the pinned Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -r requirements.txt

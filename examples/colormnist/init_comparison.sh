#!/usr/bin/env bash
# Old (torch) vs new (haiku) initialisation of the built-in MLP on ColorMNIST, reduced:
# VAE and AVAE, 5000 steps each (40 epochs of the 8000-image split at batch 64, as run.py),
# then `selfconsist eval --fast` of each pair on the 2000 held-out images.
#   OMP_NUM_THREADS=1 bash examples/colormnist/init_comparison.sh [MNIST_DIR] [OUT]
set -euo pipefail
MNIST=${1:-../shared/data/mnist}
OUT=${2:-runs/initcmp}
mkdir -p "$OUT"
for obj in vae avae; do
  for init in torch haiku; do
    /usr/bin/time -f "train $obj $init: %e s wall, %U s user" \
      python -m selfconsist train --out "$OUT/$obj-$init.safetensors" --data "colormnist:$MNIST" \
        --objective "$obj" --steps 5000 --batch-size 64 --lr 1e-3 --seed 0 --device cpu \
        --n-train 8000 --init "$init" --quiet --overwrite
  done
  /usr/bin/time -f "eval $obj: %e s wall, %U s user" \
    python -m selfconsist eval "$OUT/$obj-torch.safetensors" --compare "$OUT/$obj-haiku.safetensors" \
      --name "$obj, torch init" --compare-name "$obj, haiku init" --data "colormnist:$MNIST" \
      --n-train 8000 --fast --no-figures --device cpu --seed 0 --out "$OUT/eval-$obj" --overwrite --quiet
done

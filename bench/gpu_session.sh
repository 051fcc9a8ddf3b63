#!/usr/bin/env bash
# The GPU checks of issue 16 as one script for a device session (bench/README.md, "The
# machines on the GPU"): the CUDA tests, the GPU benchmark, a CIFAR-10 model trained on the
# GPU and its audits.  Every part writes to $OUT (default ./gpu-out) and is timed; a part
# that fails does not stop the others.  Needs the CIFAR-10 tarball at $CIFAR_TGZ (default:
# .gpu/cifar10-jpeg.tar.gz, carried with the working tree) and torch with CUDA.
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh [tests|bench|train|audits|all]
set -u
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python}
CIFAR_TGZ=${CIFAR_TGZ:-.gpu/cifar10-jpeg.tar.gz}
WHAT=${1:-all}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"

part() {  # part NAME COMMAND...: run, time, keep the output
  local name=$1; shift
  echo "== $name: $*"
  local t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(echo "$(date +%s.%N) - $t0" | bc) s (log: $OUT/$name.log)"
  tail -25 "$OUT/$name.log"
}

if [ ! -d /tmp/cifar/cifar10/train ] && [ -f "$CIFAR_TGZ" ]; then
  mkdir -p /tmp/cifar && tar -xzf "$CIFAR_TGZ" -C /tmp/cifar
fi

case $WHAT in tests|all)
  part cuda-tests $PY -m pytest -q -n 0 -rs tests/machines/test_device.py ;;
esac
case $WHAT in bench|all)
  part bench-cuda $PY bench/bench_cuda.py --data mnist5k:size=32 --data /tmp/cifar/cifar10/train \
      --memory-budget $((32 << 30)) --json "$OUT/cuda.json" ;;
esac
case $WHAT in train|all)
  # a small class-conditional CIFAR-10 model for the conditional audit (the unconditional one
  # is bench/models/cifar10-resnet)
  part train-cond $PY -m els_audit.models.zoo.train resnet-zeros --device cuda --out "$OUT/cifar10-cond" \
      --data /tmp/cifar/cifar10/train --set in_channels=3 --set width=32 --set num_classes=10 \
      --max-minutes 4 --epochs 400 --sample-steps 20 ;;
esac
case $WHAT in audits|all)
  ARCH='{"in_channels": 3, "width": 32, "n_layers": 6, "padding_mode": "zeros", "time_dim": 64}'
  part audit-uncond els-audit bench/models/cifar10-resnet/model.safetensors --arch PaperResNet \
      --arch-kwargs "$ARCH" --data /tmp/cifar/cifar10/train --device cuda --budget none --steps 20 \
      --seeds 16 --calibration-seeds 8 --memory-budget 32G --out "$OUT/audit-uncond"
  CARCH='{"in_channels": 3, "width": 32, "n_layers": 6, "padding_mode": "zeros", "time_dim": 64, "num_classes": 10}'
  part audit-cond els-audit "$OUT/cifar10-cond/model.safetensors" --arch PaperResNet --arch-kwargs "$CARCH" \
      --conditional --data /tmp/cifar/cifar10/train --device cuda --budget none --steps 20 --seeds 16 \
      --calibration-seeds 8 --memory-budget 32G --out "$OUT/audit-cond" ;;
esac

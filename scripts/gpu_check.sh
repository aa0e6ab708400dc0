#!/usr/bin/env bash
# The checks that need a CUDA device, in one go (under 10 minutes on one GPU):
#   1. tests/test_gpu.py: co-training on cuda (bfloat16 and float32) agrees with float32 on CPU;
#   2. `mlora bench` of sweeps/bench.yaml on builtin:small (hidden 1024, 8 layers, ~135M
#      parameters, built in code): concurrent vs the sequential PEFT baseline vs one adapter
#      at a time, written to bench/bench-<time>/bench.json.
#
#   scripts/gpu_check.sh
#
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
timeout 180 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
timeout 400 mlora bench sweeps/bench.yaml base_model=builtin:small --sequential-baseline --mode engine-serial "$@"

#!/usr/bin/env bash
# The RL benchmark of docs/benchmark.md: 8 GRPO experiments co-trained by mlora, against one
# plain-PEFT RL process per experiment (same samples) and TRL's GRPOTrainer per experiment.
#   pip install -e '.[trl]'   # once, for --mode trl
#   scripts/bench-rl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mlora bench sweeps/rl-bench.yaml --sequential-baseline --mode trl "$@"

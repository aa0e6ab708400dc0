#!/usr/bin/env bash
# The whole benchmark of sweeps/bench.yaml: sequential baseline, concurrent, engine-serial and
# the concurrency curve, in one run, written to bench/bench-<time>/bench.json.
# Run it on an otherwise idle machine: the figures are medians and ratios of one run.
set -euo pipefail
cd "$(dirname "$0")/.."
mlora bench sweeps/bench.yaml --sequential-baseline --mode engine-serial --concurrency 1,2,4 "$@"

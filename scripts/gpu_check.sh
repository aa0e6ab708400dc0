#!/usr/bin/env bash
# The checks that need a CUDA device, in one go (under 10 minutes on one GPU). Results go to
# OUT (default bench/gpu-check-<time>/; $OUT when the device runner sets it) for docs/devices.md:
#   1. gpu_probe.py: host syncs per phase of a fused step (sync debug mode), an fp32 cross-check of
#      the batched path, the per-adapter path and the CPU, and a profile of one builtin:small step;
#   2. tests/test_gpu.py: several steps against the CPU (unequal groups, dropout, bf16, generation,
#      RL sampling), and a cuda run with strategies and RL stopped and resumed;
#   3. `mlora bench` of sweeps/bench.yaml on builtin:small with the sequential baseline on the GPU;
#   4. with the time left of 570 s less 200 s kept for 5 (at least 100 s), `mlora bench` of
#      sweeps/rl-bench.yaml on builtin:small (5 SFT + 12 GRPO steps): RL throughput against the
#      plain-PEFT RL baseline, sampling and RL-step fusion, what sharing prompts gives;
#   5. with the time left (at least 120 s), the adaptive-search benchmark on the GPU: the full
#      grid of sweeps/search-bench.yaml co-trained (all 32 at once), the search (8 slots), one
#      process per trial for what time remains (scripts/bench-search.py --time-limit-s). Replay
#      it afterwards on any machine: python scripts/search-replay.py OUT/search/grid/*/
#      OUT/search/search/*/ --sweep sweeps/search-bench.yaml --seeds 30 --variant
#      max_concurrent=4 (docs/search.md).
#
#   scripts/gpu_check.sh            # or: OUT=/some/folder scripts/gpu_check.sh
#
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))" \
  | tee "$out/gpu.txt" || exit 1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
status=0
timeout 120 python scripts/gpu_probe.py "$out" 2>&1 | tee "$out/probe.log" || status=1
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rA 2>&1 | tee "$out/tests.log" || status=1
timeout 200 mlora bench sweeps/bench.yaml base_model=builtin:small --sequential-baseline --output "$out/bench" "$@" \
  2>&1 | tee "$out/bench.log" || status=1
cp "$out"/bench/*/bench.json "$out/bench.json" 2>/dev/null || true
left=$((570 - 200 - SECONDS))  # the RL bench takes what the checks above left of the 10 minutes, less the search's
if [ "$left" -ge 100 ]; then
  timeout "$left" mlora bench sweeps/rl-bench.yaml base_model=builtin:small tasks.0.steps=5 tasks.1.steps=12 \
    --sequential-baseline --output "$out/rl-bench" 2>&1 | tee "$out/rl-bench.log" || status=1
  cp "$out"/rl-bench/*/bench.json "$out/rl-bench.json" 2>/dev/null || true
else
  echo "RL bench skipped: ${left} s left of 570 less 200 for the search" | tee "$out/rl-bench.log"
fi
left=$((570 - SECONDS))
if [ "$left" -ge 120 ]; then
  timeout "$left" python scripts/bench-search.py --sweep sweeps/search-bench.yaml --set devices=cuda:0 \
    --set max_concurrent=8 --grid-set max_concurrent=32 --max-process-trials 32 \
    --time-limit-s $((left - 15)) --out "$out/search" 2>&1 | tee "$out/search.log" || status=1
else
  echo "search bench skipped: ${left} s left of 570" | tee "$out/search.log"
fi
echo "results in $out (probe.json, tests.log, bench.json, rl-bench.json, search/bench-search.json); exit $status"
exit $status

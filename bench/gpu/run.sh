#!/usr/bin/env bash
# The CUDA engine's GPU tests and benchmark, in one command on a GPU machine.
#
#   bench/gpu/run.sh [BUNDLE]      (default BUNDLE: .gpu)
#
# BUNDLE is what scripts/gpu-bundle made from a build here:
#   cmake -S . -B build-cuda -G Ninja -DMUON_CUDA=ON
#   ninja -C build-cuda cuda_engine_test ns_bench
#   scripts/gpu-bundle .gpu build-cuda/bin/cuda_engine_test build-cuda/bin/ns_bench
# Logs and JSON go to $OUT (or /tmp/muon-gpu-bench); the table prints last.
set -uo pipefail
bundle=${1:-.gpu}
out=${OUT:-/tmp/muon-gpu-bench}
mkdir -p "$out"
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
source "$bundle/env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv | tee "$out/gpu.txt"
date -u | tee -a "$out/gpu.txt"

status=0
"$bundle/bin/cuda_engine_test" --gtest_output="xml:$out/cuda_engine_test.xml" 2>&1 |
  tee "$out/test.log" | grep -E '^\[ (info|  FAILED|  PASSED|  SKIPPED) |Failure|error|Expected|Which is|actual' || true
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
tail -3 "$out/test.log"

"$bundle/bin/ns_bench" --json "$out/ours.json" 2>&1 | tee "$out/ns_bench.log" || status=1
PYTHONUNBUFFERED=1 python3 "$script_dir/torch_ns.py" --ours "$out/ours.json" --json "$out/torch.json" \
  2>&1 | tee "$out/table.txt" || status=1
exit $status

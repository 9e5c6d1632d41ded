#!/usr/bin/env bash
# Load on a GPU machine with the CUDA engine: parameter-server capacity (one
# GPT-2-small session stepped by W workers together, W = 1..16), the
# 16-client load of docs/performance.md with the server's RSS, and the
# checkpoint/kill -9 test against the CUDA engine.
#
#   bench/gpu/load_check.sh [BUNDLE]      (default BUNDLE: .gpu)
#   MUON_LOAD_WORKERS="1 2" bench/gpu/load_check.sh   (other worker counts)
#
# Make the bundle here and pack it (the OpenBLAS in it is large):
#   ninja -C build muon-server muonctl muon_durability_test
#   scripts/gpu-bundle .gpu build/bin/muon-server build/bin/muonctl \
#     build/bin/muon_durability_test
#   tar -C .gpu -cJf gpu.tar.xz . && rm -rf .gpu && mkdir .gpu && mv gpu.tar.xz .gpu/
set -uo pipefail
bundle=${1:-.gpu}
[[ -f $bundle/gpu.tar.xz ]] && tar -C "$bundle" -xJf "$bundle/gpu.tar.xz"
# shellcheck source=/dev/null
source "$bundle/env.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export MUON_BUILD=$bundle MUON_LOAD_SERVER_FLAGS=--engine=cuda
status=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for workers in ${MUON_LOAD_WORKERS:-1 2 4 8 16}; do
  echo "== parameter server, gpt2-small, $workers worker(s), fp32 wire"
  bench/load.sh --clients=1 --workers=$workers --parameter_server --model=gpt2-small --steps=10 \
    --duration_limit=150s 2>&1 | grep -E "clients:|throughput|latency|RSS after" || status=1
done
echo "== 16 clients x 200 steps, small"
bench/load.sh --clients=16 --steps=200 --duration_limit=300s || status=1
echo "== muon_durability_test, CUDA engine"
MUON_SERVER_BIN=$bundle/bin/muon-server MUONCTL_BIN=$bundle/bin/muonctl MUON_TEST_ENGINE=cuda \
  "$bundle/bin/muon_durability_test" 2>&1 | grep -E "^\[|Failure|Expected|Which" || status=1
exit $status

#!/usr/bin/env bash
# Makes the bundle bench/gpu/run_all.sh runs on a GPU machine, from the build
# in build/ (cmake --build build first):
#
#   bench/gpu/make_bundle.sh OUTDIR [PEERS_DIR]
#
# PEERS_DIR, when given, holds the peers' code to time beside ours
# (flash_muon/ from flash-muon, newton_schulz_triton.py from Turbo-Muon's
# flash-newton-schulz); it is copied to OUTDIR/peers. OUTDIR ends up holding
# one xz archive (the carry limit is 64 MiB; the libraries are large).
set -euo pipefail
out=$1
peers=${2:-}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
rm -rf "$out"
scripts/gpu-bundle "$out" build/bin/{cuda_engine_test,ns_bench,muon-server,muonctl} \
  build/bin/{muon_server_integration_test,muon_server_security_test,muon_durability_test} \
  build/bin/muon_parameter_server_test >/dev/null
# iperf3 for run_all.sh's `service` part (the GPU machine may lack it).
if command -v iperf3 >/dev/null; then scripts/gpu-bundle "$out" "$(command -v iperf3)" >/dev/null; fi
strip "$out"/bin/*
mkdir -p "$out/src" "$out/python" "$out/peers"
cp -r bench/gpu "$out/src/gpu"
mkdir -p "$out/src/bench" && cp bench/train_step.py "$out/src/bench/"
cp -r client/python "$out/src/client"
cp -r tests/python "$out/src/tests_python"
cp -r build/python/muon "$out/python/"
[[ -n $peers ]] && cp -r "$peers"/. "$out/peers/"
find "$out" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$out" -cJf /tmp/gpu-bundle.tar.xz .
rm -rf "$out" && mkdir -p "$out" && mv /tmp/gpu-bundle.tar.xz "$out/gpu.tar.xz"
cp bench/gpu/run_all.sh "$out/run_all.sh"
du -sh "$out"

#!/usr/bin/env bash
# The GPU-labelled test and the integration tests against the CUDA engine,
# on a GPU machine, from a bundle made here:
#   ninja -C build muon-server muonctl cuda_engine_test muon_server_integration_test \
#     muon_server_security_test muon_durability_test muon_parameter_server_test
#   scripts/gpu-bundle .gpu build/bin/{muon-server,muonctl,cuda_engine_test} \
#     build/bin/{muon_server_integration_test,muon_server_security_test,muon_durability_test} \
#     build/bin/muon_parameter_server_test
#   tar -C .gpu -cJf gpu.tar.xz . && rm -rf .gpu && mkdir .gpu && mv gpu.tar.xz .gpu/
#
#   bench/gpu/tests.sh [BUNDLE]      (default BUNDLE: .gpu)
set -uo pipefail
bundle=${1:-.gpu}
[[ -f $bundle/gpu.tar.xz ]] && tar -C "$bundle" -xJf "$bundle/gpu.tar.xz"
# shellcheck source=/dev/null
source "$bundle/env.sh"
export MUON_SERVER_BIN=$bundle/bin/muon-server MUONCTL_BIN=$bundle/bin/muonctl
export MUON_TEST_ENGINE=cuda
status=0
for test in cuda_engine_test muon_server_integration_test muon_server_security_test \
  muon_durability_test muon_parameter_server_test; do
  echo "== $test"
  "$bundle/bin/$test" >"/tmp/$test.log" 2>&1 || status=1
  grep -E '^\[  (PASSED|FAILED|SKIPPED) |Failure|Expected|Which is' "/tmp/$test.log" | head -20
done
exit $status

#!/usr/bin/env bash
# The service on a GPU machine: muon-server with the CUDA engine, the Python
# example trained against it with --check (remote vs a local PyTorch Muon),
# muonctl bench through the service, and raw loopback TCP bandwidth (iperf3)
# for comparison, when muonctl and iperf3 are bundled.
#
#   bench/gpu/service_check.sh [BUNDLE]      (default BUNDLE: .gpu)
#
# Make the bundle here, and pack it (the OpenBLAS in it is large):
#   ninja -C build muon-server muonctl muon_python_stubs
#   scripts/gpu-bundle .gpu build/bin/muon-server build/bin/muonctl /usr/bin/iperf3
#   cp -r build/python/muon .gpu/python/
#   tar -C .gpu -cJf gpu.tar.xz . && rm -rf .gpu && mkdir .gpu && mv gpu.tar.xz .gpu/
# The GPU machine's python3 must have torch and grpcio.
set -uo pipefail
bundle=${1:-.gpu}
[[ -f $bundle/gpu.tar.xz ]] && tar -C "$bundle" -xJf "$bundle/gpu.tar.xz"
# shellcheck source=/dev/null
source "$bundle/env.sh"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=$(mktemp -d)
"$bundle/bin/muon-server" --engine=cuda --listen=127.0.0.1:0 --port_file="$work/port" \
  --metrics_listen= >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 200); do [[ -s $work/port ]] && break; sleep 0.1; done
if [[ ! -s $work/port ]]; then cat "$work/server.log"; exit 1; fi
address=127.0.0.1:$(cat "$work/port")
python3 -c 'import grpc, google.protobuf, torch; print("python", grpc.__version__, google.protobuf.__version__, torch.__version__)'
status=0
PYTHONPATH="$bundle/python:$repo/client/python" python3 "$repo/client/python/examples/train_tiny.py" \
  --server="$address" --steps=200 --check || status=1
if [[ -x $bundle/bin/muonctl ]]; then
  for model in gpt2-small gpt2-medium llama-1b small-256; do
    "$bundle/bin/muonctl" --server="$address" bench --model=$model --steps=20 || status=1
  done
fi
if [[ -x $bundle/bin/iperf3 ]]; then
  "$bundle/bin/iperf3" -s -1 -p 5201 >/dev/null 2>&1 &
  sleep 1
  "$bundle/bin/iperf3" -c 127.0.0.1 -p 5201 -t 5 | tail -4
fi
kill -TERM "$server"; wait "$server"
tail -5 "$work/server.log"
exit $status

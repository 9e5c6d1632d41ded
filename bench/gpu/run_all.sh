#!/usr/bin/env bash
# Every GPU measurement and GPU-side test of the project in one command on a
# GPU machine, each part time-boxed so the whole fits one 10-minute call:
#   1. cuda_engine_test (the CUDA engine against the CPU engine);
#   2. ns_bench (our Newton–Schulz: plain, bf16, Gram; the accuracy table;
#      whole engine steps) and torch_ns.py (PyTorch, PyTorch Gram, peers) in
#      the same run, then the table of docs/performance.md;
#   3. the integration, security, durability and parameter-server tests
#      against the CUDA engine (as tests.sh);
#   4. the Python client's tests under the machine's torch, and
#      client/python/examples/train_tiny.py --check against a CUDA server;
#   5. the service benchmarks against a CUDA-engine server (bench/wire.sh's
#      measurement and `muonctl bench --model=gpt2-small --steps=5`);
#   6. bench/train_step.py (GPT-2 small trained on 8 cores, the optimizer on
#      the GPU: local, sending after backward, streaming during backward).
#
#   bench/gpu/run_all.sh [BUNDLE [PARTS]]
#     (default .gpu, "engine bench tests python service train peers")
#
# PARTS picks among engine (1), bench (2), tests (3), python (4), service (5),
# train (6) and peers (7: flash-muon's and Turbo-Muon's own code from BUNDLE/peers,
# timed last because their Triton autotuning takes minutes).
#
# The bundle, made here (the binaries with their libraries, the scripts, the
# Python stubs and client, the peers' code):
#   ninja -C build cuda_engine_test ns_bench muon-server muon_server_integration_test \
#     muon_server_security_test muon_durability_test muon_parameter_server_test muon_python_stubs
#   scripts/gpu-bundle .gpu build/bin/{cuda_engine_test,ns_bench,muon-server,muonctl} \
#     build/bin/{muon_server_integration_test,muon_server_security_test,muon_durability_test} \
#     build/bin/muon_parameter_server_test
#   strip .gpu/bin/*
#   mkdir -p .gpu/src && cp -r bench/gpu .gpu/src/gpu && cp -r client/python .gpu/src/client \
#     && cp -r tests/python .gpu/src/tests_python
#   mkdir -p .gpu/python && cp -r build/python/muon .gpu/python/
#   mkdir -p .gpu/peers   # optional: flash_muon/ (flash-muon), newton_schulz_triton.py (Turbo-Muon)
#   tar -C .gpu -cJf gpu.tar.xz . && rm -rf .gpu && mkdir .gpu && mv gpu.tar.xz .gpu/
# Logs go to $OUT (or /tmp/muon-gpu-all), at most 8 files; the tables print last.
set -uo pipefail
bundle=${1:-.gpu}
parts=" ${2:-engine bench tests python service train peers} "
out=${OUT:-/tmp/muon-gpu-all}
mkdir -p "$out"
[[ -f $bundle/gpu.tar.xz ]] && tar -C "$bundle" -xJf "$bundle/gpu.tar.xz"
# shellcheck source=/dev/null
source "$bundle/env.sh"
src=$bundle/src
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  date -u
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} >"$out/tests.log" 2>&1

if [[ $parts == *" engine "* ]]; then
  echo "== cuda_engine_test" | tee -a "$out/tests.log"
  timeout 180 "$bundle/bin/cuda_engine_test" >"$out/cuda_engine_test.log" 2>&1 || status=1
  grep -E '^\[ info|^\[  (PASSED|FAILED|SKIPPED) |Failure|Expected|Which is' \
    "$out/cuda_engine_test.log" | head -80 | tee -a "$out/tests.log"
fi

if [[ $parts == *" bench "* ]]; then
  echo "== ns_bench" | tee -a "$out/tests.log"
  timeout 420 "$bundle/bin/ns_bench" --iters 20 --warmup 4 --json "$out/ours.json" \
    >"$out/ns_bench.log" 2>&1 || status=1
  echo "== torch_ns.py" | tee -a "$out/tests.log"
  PYTHONUNBUFFERED=1 timeout 240 python3 "$src/gpu/torch_ns.py" --ours "$out/ours.json" \
    --json "$out/torch.json" --iters 10 >"$out/table.txt" 2>&1 || status=1
fi

export MUON_SERVER_BIN=$bundle/bin/muon-server MUONCTL_BIN=$bundle/bin/muonctl MUON_TEST_ENGINE=cuda
tests=""
[[ $parts == *" tests "* ]] && tests="muon_server_integration_test muon_server_security_test \
  muon_durability_test muon_parameter_server_test"
for test in $tests; do
  echo "== $test" | tee -a "$out/tests.log"
  timeout 120 "$bundle/bin/$test" >/tmp/$test.log 2>&1 || status=1
  grep -E '^\[  (PASSED|FAILED|SKIPPED) |Failure|Expected|Which is' /tmp/$test.log | head -20 |
    tee -a "$out/tests.log"
done

# The Python tests start their own (CPU-engine) servers; what they test here
# is the client under this machine's torch and grpcio.
bundle_abs=$(cd "$bundle" && pwd)
export MUON_SERVER_BIN=$bundle_abs/bin/muon-server
export PYTHONPATH=$bundle_abs/python:$bundle_abs/src/client
export MUON_EXAMPLES=$bundle_abs/src/client/examples
if [[ $parts == *" python "* ]]; then
  for file in "$src"/tests_python/*_test.py; do
    test=$(basename "$file" .py)
    echo "== python $test" | tee -a "$out/tests.log"
    (cd "$src/tests_python" && timeout 120 python3 -m unittest "$test") >/tmp/py_$test.log 2>&1 ||
      status=1
    tail -3 /tmp/py_$test.log | tee -a "$out/tests.log"
  done

  echo "== train_tiny.py --check against a CUDA-engine server" | tee -a "$out/tests.log"
  work=$(mktemp -d)
  "$bundle/bin/muon-server" --engine=cuda --listen=127.0.0.1:0 --port_file="$work/port" \
    --metrics_listen= >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 200); do [[ -s $work/port ]] && break; sleep 0.1; done
  timeout 120 python3 "$src/client/examples/train_tiny.py" \
    --server="127.0.0.1:$(cat "$work/port")" --steps=200 --check 2>&1 | tail -6 |
    tee -a "$out/tests.log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  kill -TERM "$server"
  wait "$server"
fi

# The service on the GPU machine (docs/performance.md "Wire"): bytes/s
# through muon-server for GPT-2 small's gradients as AdamW parameters
# (negligible compute) in fp32 and bf16 wire, beside raw loopback TCP in the
# same run: iperf3 when bundled or installed, else a Python socket loopback
# (one connection, 5 s of 4 MiB sends; labelled as such, not comparable
# with iperf3 figures). Then a GPT-2-small Muon step through the service.
if [[ $parts == *" service "* ]]; then
  echo "== service" | tee -a "$out/tests.log"
  work=$(mktemp -d)
  "$bundle/bin/muon-server" --engine=cuda --listen=127.0.0.1:0 --port_file="$work/port" \
    --metrics_listen= >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 200); do [[ -s $work/port ]] && break; sleep 0.1; done
  address=127.0.0.1:$(cat "$work/port")
  {
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    iperf=$(command -v iperf3 || true)
    [[ -x $bundle/bin/iperf3 ]] && iperf=$bundle/bin/iperf3
    if [[ -n $iperf ]]; then
      "$iperf" -s -1 -B 127.0.0.1 -p 5201 >/dev/null 2>&1 &
      sleep 1
      timeout 20 "$iperf" -c 127.0.0.1 -p 5201 -t 5 -J | python3 -c 'import json, sys
print("loopback TCP (iperf3, one stream, 5 s): %.3g B/s" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8))'
    else
      timeout 30 python3 - <<'PY'
import socket, threading, time
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
got = [0]
def sink():
    conn, _ = server.accept()
    while True:
        b = conn.recv(1 << 22)
        if not b: break
        got[0] += len(b)
t = threading.Thread(target=sink); t.start()
c = socket.create_connection(server.getsockname()); buf = b"x" * (1 << 22)
start = time.time()
while time.time() - start < 5: c.sendall(buf)
c.close(); t.join()
print("loopback TCP (python socket loopback, NOT iperf3; one connection, 5 s): %.3g B/s" % (got[0] / (time.time() - start)))
PY
    fi
    for dtype in float32 bfloat16; do
      echo "-- wire: muonctl bench --optimizer=adamw --dtype=$dtype (GPT-2 small's gradients)"
      timeout 120 "$bundle/bin/muonctl" bench --server="$address" --model=gpt2-small \
        --optimizer=adamw --dtype=$dtype --steps=5 --warmup=1 --progress=false \
        --name=wire-$dtype || echo "exit $?"
    done
    echo "-- muonctl bench --model=gpt2-small --steps=5 (Muon, CUDA engine)"
    timeout 120 "$bundle/bin/muonctl" bench --server="$address" --model=gpt2-small --steps=5 \
      --progress=false --name=gpt2 || echo "exit $?"
    echo "-- muonctl info"
    "$bundle/bin/muonctl" --server="$address" info | grep -E '^(engine|device):'
  } >"$out/service.txt" 2>&1 || status=1
  grep -q '^exit ' "$out/service.txt" && status=1
  kill -TERM "$server"
  wait "$server"
  tail -3 "$work/server.log" >>"$out/service.txt"
fi

# The training step of docs/performance.md ("Training step") with the
# optimizer on the GPU: bench/train_step.py's GPT-2-small model trained on 8
# of the machine's cores against a CUDA-engine server (its own cores): local
# Muon on the trainer's CPU, RemoteMuon sending after backward, and streaming
# during backward.
if [[ $parts == *" train "* ]]; then
  echo "== train" | tee -a "$out/tests.log"
  PYTHONUNBUFFERED=1 timeout "${TRAIN_SECONDS:-200}" python3 "$src/bench/train_step.py" \
    --preset=gpt2-small --steps=3 --threads=8 --server_bin="$bundle/bin/muon-server" \
    --server_flags=--engine=cuda >"$out/train.txt" 2>&1
  echo "train_step.py exit $?" >>"$out/train.txt"
fi

# Last: the peers' own code, whose Triton autotuning and compiles take minutes
# (a timeout here is reported in peers.txt, and is not a failure).
if [[ $parts == *" peers "* ]]; then
  echo "== peers" | tee -a "$out/tests.log"
  PYTHONUNBUFFERED=1 timeout "${PEERS_SECONDS:-150}" python3 "$src/gpu/torch_ns.py" \
    --peers "$bundle/peers" --peers_only --iters 10 >"$out/peers.txt" 2>&1
  echo "torch_ns.py --peers_only exit $?" >>"$out/peers.txt"
fi

echo "== summary (status $status)"
grep -E '^\[  (PASSED|FAILED) |^== ' "$out/tests.log"
[[ -f $out/ns_bench.log ]] && head -60 "$out/ns_bench.log"
[[ -f $out/table.txt ]] && tail -30 "$out/table.txt"
[[ -f $out/service.txt ]] && cat "$out/service.txt"
[[ -f $out/train.txt ]] && tail -30 "$out/train.txt"
[[ -f $out/peers.txt ]] && cat "$out/peers.txt"
exit $status

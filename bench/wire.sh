#!/usr/bin/env bash
# Wire benchmark: bytes/s through one muon-server on loopback for a session
# whose compute is negligible (GPT-2 small's 48 matrices as AdamW parameters:
# the same 340 MB of fp32 gradients per step as the Muon bench), in fp32 and
# bf16 wire, beside iperf3 over loopback measured in the same run, repeated
# and reported as medians with the load average (docs/performance.md, "Wire").
#   bench/wire.sh            # 3 rounds of 5 steps each
#   MUON_WIRE_ROUNDS=5 MUON_WIRE_STEPS=10 bench/wire.sh
# Needs iperf3 (Debian: apt-get install iperf3). Extra server flags go in
# MUON_WIRE_SERVER_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MUON_BUILD:-build}
rounds=${MUON_WIRE_ROUNDS:-3}
steps=${MUON_WIRE_STEPS:-5}
command -v iperf3 >/dev/null || { echo "wire.sh needs iperf3" >&2; exit 1; }
dir=$(mktemp -d)
iperf_port=$((20000 + RANDOM % 20000))
cleanup() {
  kill "$server" "$iperf" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
# shellcheck disable=SC2086
"$build/bin/muon-server" --listen=127.0.0.1:0 --port_file="$dir/port" --metrics_listen= \
  ${MUON_WIRE_SERVER_FLAGS:-} 2>"$dir/server.log" &
server=$!
iperf3 -s -B 127.0.0.1 -p "$iperf_port" >/dev/null 2>&1 &
iperf=$!
for _ in $(seq 200); do [[ -s "$dir/port" ]] && break; sleep 0.05; done
[[ -s "$dir/port" ]] || { cat "$dir/server.log"; exit 1; }
sleep 0.5  # iperf3 -s listening
load() { cut -d' ' -f1 /proc/loadavg; }
# Bytes/s of one muonctl bench: gradients in + updates out over client wall time.
service() {
  "$build/bin/muonctl" bench --server="127.0.0.1:$(cat "$dir/port")" --model=gpt2-small \
    --optimizer=adamw --dtype="$1" --steps="$steps" --warmup=1 --progress=false \
    --name=wire-bench | awk '/^bytes\/s:/ {
      v = $2; u = $3; f = (u == "GB/s") ? 1e9 : (u == "MB/s") ? 1e6 : 1e3; print v * f }'
}
# Bytes/s of iperf3's one stream over 5 s, as its receiver counted them.
tcp() {
  iperf3 -c 127.0.0.1 -p "$iperf_port" -t 5 -J |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8)'
}
printf '%-6s %-6s %14s %14s %14s %7s %7s\n' round load iperf3_B/s fp32_B/s bf16_B/s fp32 bf16
for round in $(seq "$rounds"); do
  l=$(load)
  t=$(tcp)
  f=$(service float32)
  b=$(service bfloat16)
  printf '%-6s %-6s %14.0f %14.0f %14.0f %7.3f %7.3f\n' "$round" "$l" "$t" "$f" "$b" \
    "$(echo "$f / $t" | bc -l)" "$(echo "$b / $t" | bc -l)" | tee -a "$dir/rows"
done
awk '{ t[NR] = $3; f[NR] = $4; b[NR] = $5; rf[NR] = $6; rb[NR] = $7 }
  function median(a, n,   i, j, x) {
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  END { printf "median  iperf3 %.3g B/s, fp32 %.3g B/s (%.3f of iperf3), bf16 %.3g B/s (%.3f)\n",
        median(t, NR), median(f, NR), median(rf, NR), median(b, NR), median(rb, NR) }' "$dir/rows"

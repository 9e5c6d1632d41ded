#!/usr/bin/env bash
# Wire benchmark: bytes/s through one muon-server on loopback for GPT-2
# small's 48 matrices (340 MB of fp32 gradients per step, the same bytes as
# the Muon bench), in fp32 and bf16 wire, beside iperf3 over loopback
# measured in the same run (one stream, and --bidir: both directions at
# once), repeated and reported as medians with the load average
# (docs/performance.md, "Wire"). The ratios are to iperf3's one direction,
# though a step's bytes (gradients in + updates out) go both ways. Two
# sessions per wire type: echo (benchmark_echo: no optimizer, each update is
# its gradient; the server runs with --allow_benchmark_sessions) and adamw
# (AdamW parameters: element-wise compute).
#   bench/wire.sh            # 3 rounds of 5 steps each
#   MUON_WIRE_ROUNDS=5 MUON_WIRE_STEPS=10 bench/wire.sh
#   MUON_WIRE_OPTIMIZERS=adamw MUON_BUILD=../main/build bench/wire.sh  # a build without echo
# Needs iperf3 (Debian: apt-get install iperf3). Extra server flags go in
# MUON_WIRE_SERVER_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MUON_BUILD:-build}
rounds=${MUON_WIRE_ROUNDS:-3}
steps=${MUON_WIRE_STEPS:-5}
read -r -a optimizers <<<"${MUON_WIRE_OPTIMIZERS:-echo adamw}"
allow=
[[ " ${optimizers[*]} " == *" echo "* ]] && allow=--allow_benchmark_sessions
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
  $allow ${MUON_WIRE_SERVER_FLAGS:-} 2>"$dir/server.log" &
server=$!
iperf3 -s -B 127.0.0.1 -p "$iperf_port" >/dev/null 2>&1 &
iperf=$!
for _ in $(seq 200); do [[ -s "$dir/port" ]] && break; sleep 0.05; done
[[ -s "$dir/port" ]] || { cat "$dir/server.log"; exit 1; }
sleep 0.5  # iperf3 -s listening
load() { cut -d' ' -f1 /proc/loadavg; }
# Bytes/s of one muonctl bench (optimizer $1, wire dtype $2): gradients in +
# updates out over client wall time, in the steady state: the first two steps
# allocate the session's buffers (the second step's updates go into new
# ones while the first step's record holds the first), so they warm up.
service() {
  "$build/bin/muonctl" bench --server="127.0.0.1:$(cat "$dir/port")" --model=gpt2-small \
    --optimizer="$1" --dtype="$2" --steps="$steps" --warmup=2 --progress=false \
    --name=wire-bench | awk '/^bytes\/s:/ {
      v = $2; u = $3; f = (u == "GB/s") ? 1e9 : (u == "MB/s") ? 1e6 : 1e3; printf "%.0f\n", v * f }'
}
# Bytes/s of iperf3's one stream over 5 s, as its receiver counted them.
tcp() {
  iperf3 -c 127.0.0.1 -p "$iperf_port" -t 5 -J |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8)'
}
# The same, both directions at once (--bidir): the sum of what each
# receiver counted, the yardstick of a transfer that, like a step, goes both
# ways.
tcp_bidir() {
  iperf3 -c 127.0.0.1 -p "$iperf_port" -t 5 --bidir -J |
    python3 -c 'import json, sys; e = json.load(sys.stdin)["end"]; print((e["sum_received"]["bits_per_second"] + e["sum_received_bidir_reverse"]["bits_per_second"]) / 8)'
}
columns=()
for o in "${optimizers[@]}"; do columns+=("$o/fp32" "$o/bf16"); done
printf '%-6s %-6s %12s %12s' round load iperf3_B/s bidir_B/s
for c in "${columns[@]}"; do printf ' %12s %6s' "$c" ratio; done
printf '\n'
for round in $(seq "$rounds"); do
  l=$(load)
  t=$(tcp)
  t2=$(tcp_bidir)
  row="$round $l $t $t2"
  line=$(printf '%-6s %-6s %12.0f %12.0f' "$round" "$l" "$t" "$t2")
  for o in "${optimizers[@]}"; do
    for d in float32 bfloat16; do
      v=$(service "$o" "$d")
      r=$(echo "$v / $t" | bc -l)
      row="$row $v $r"
      line="$line $(printf ' %12.0f %6.3f' "$v" "$r")"
    done
  done
  echo "$line"
  echo "$row" >>"$dir/rows"
done
# Medians of every column (iperf3, bidir, then each session's B/s and its
# ratio to iperf3's one direction).
awk -v names="${columns[*]}" '
  { for (i = 3; i <= NF; i++) col[i, NR] = $i; n = NF }
  function median(c,   a, i, j, x, k) {
    for (i = 1; i <= NR; i++) a[i] = col[c, i]
    for (i = 2; i <= NR; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
  }
  END {
    k = split(names, name, " ")
    printf "median  iperf3 %.3g B/s, bidir %.3g B/s", median(3), median(4)
    for (i = 1; i <= k; i++) printf ", %s %.3g B/s (%.3f)", name[i], median(3 + 2 * i), median(4 + 2 * i)
    printf "\n"
  }' "$dir/rows"

#!/usr/bin/env bash
# The CPU engine's GPT-2-small Muon step against PyTorch's CPU Muon
# (bench/torch_muon_cpu.py: momentum + 5 Newton–Schulz steps, bmm-batched by
# shape) at the same thread counts (1 and every core), and the service step
# (muon-server with default flags, muonctl bench) against the same PyTorch
# figure at every core, in the same run: rounds alternate the contenders and
# report medians with the load average (docs/performance.md, "CPU engine
# against PyTorch").
#   bench/cpu_vs_torch.sh               # 3 rounds
#   MUON_CVT_ROUNDS=5 bench/cpu_vs_torch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MUON_BUILD:-build}
rounds=${MUON_CVT_ROUNDS:-3}
cores=$(nproc)
dir=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
"$build/bin/muon-server" --listen=127.0.0.1:0 --port_file="$dir/port" --metrics_listen= \
  2>"$dir/server.log" &
server=$!
for _ in $(seq 200); do [[ -s "$dir/port" ]] && break; sleep 0.05; done
[[ -s "$dir/port" ]] || { cat "$dir/server.log"; exit 1; }
load() { cut -d' ' -f1 /proc/loadavg; }
# Seconds of one engine step (jordan) at $1 compute threads.
engine() {
  "$build/bin/muon_cpu_bench" --benchmark_filter="BM_Gpt2SmallStep/0/$1/" \
    --benchmark_format=json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["benchmarks"][0]["real_time"] / 1e3)'
}
torch_step() {
  /usr/bin/python3 bench/torch_muon_cpu.py --threads="$1" --steps=2 | awk '/median/ {print $3}'
}
# Median client step seconds of 2 service steps after a warm-up.
service() {
  "$build/bin/muonctl" bench --server="127.0.0.1:$(cat "$dir/port")" --model=gpt2-small \
    --steps=2 --warmup=1 --progress=false --step_timeout=900s --name=cpu-vs-torch |
    awk '/^latency client step/ {print $5 / 1e3}'
}
printf '%-5s %-5s %9s %9s %9s %9s %9s %-5s\n' round load engine1 torch1 "engine$cores" \
  "torch$cores" service load_end
for round in $(seq "$rounds"); do
  l=$(load)
  e1=$(engine 1); t1=$(torch_step 1); en=$(engine "$cores"); tn=$(torch_step "$cores")
  s=$(service)
  printf '%-5s %-5s %9.2f %9.2f %9.2f %9.2f %9.2f %-5s\n' "$round" "$l" "$e1" "$t1" "$en" "$tn" \
    "$s" "$(load)" | tee -a "$dir/rows"
done
python3 - "$dir/rows" "$cores" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
col = lambda i: statistics.median(float(r[i]) for r in rows)
e1, t1, en, tn, s = (col(i) for i in range(2, 7))
print(f"median seconds per step: engine {e1:.2f} vs torch {t1:.2f} at 1 thread "
      f"(torch/engine {t1 / e1:.2f}); engine {en:.2f} vs torch {tn:.2f} at {sys.argv[2]} "
      f"(torch/engine {tn / en:.2f}); service {s:.2f} (torch/service {tn / s:.2f})")
PY

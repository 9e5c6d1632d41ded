#!/usr/bin/env bash
# Parameter-server steps against update mode on one machine, same model, in
# one run: `muonctl load` (through bench/load.sh, a fresh server each) with
# one update-mode client, then one parameter-server session of W = 1, 2, 4,
# 8 worker threads. Prints a markdown table; W=1 over update mode is the
# figure docs/parameter-server.md#capacity tracks.
#   bench/ps_vs_updates.sh                      # --model=small-256 --steps=10
#   bench/ps_vs_updates.sh --model=gpt2-small --steps=5
#   MUON_PS_WORKERS="1 2" bench/ps_vs_updates.sh
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[[ ${#args[@]} -eq 0 ]] && args=(--model=small-256 --steps=10)
workers=${MUON_PS_WORKERS:-1 2 4 8}
echo "$(date -u +%FT%TZ) $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), ${args[*]}"
row() {  # mode label, load arguments
  local label=$1
  shift
  local out
  out=$(bench/load.sh --clients=1 --progress=false "${args[@]}" "$@" 2>&1) || { echo "$out"; exit 1; }
  local rate p50 gin commit
  rate=$(sed -n 's/^throughput: \([0-9.]*\) steps\/s.*/\1/p' <<<"$out")
  p50=$(sed -n 's/^step latency: p50 \([0-9.]*\) ms.*/\1/p' <<<"$out")
  gin=$(sed -n 's/^server, p50: gradients in \([0-9.]*\) ms.*/\1/p' <<<"$out")
  commit=$(sed -n 's/.*, committed \([0-9.]*\) ms after the header/\1/p' <<<"$out")
  echo "| $label | $rate | $p50 ms | $gin ms | $commit ms |"
  return 0
}
echo "| mode | steps/s | step p50 | gradients in (p50) | committed (p50) |"
echo "| --- | --- | --- | --- | --- |"
row updates
for w in $workers; do
  row "parameter server, W = $w" --parameter_server --workers="$w"
done
echo "(load average after: $(cut -d' ' -f1-3 /proc/loadavg))"

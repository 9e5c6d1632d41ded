#!/usr/bin/env bash
# Parameter-server steps against update mode on one machine, same model, in
# one run: `muonctl load` (through bench/load.sh, a fresh server each) with
# one update-mode client, then one parameter-server session of W = 1, 2, 4,
# 8 worker threads. The sequence runs MUON_PS_ROUNDS times (default 1), one
# mode after the other, so that a busy machine's swings fall on every mode
# alike; the last table holds each mode's median, and its steps/s over
# update mode's of the same round, the median over the rounds (a busy
# machine's swings, slower than a round, then cancel). W = 1 over update
# mode is the figure docs/parameter-server.md#capacity tracks. MUON_PS_BUILDS lists
# build folders to set side by side (default: build): each mode runs on
# each of them in turn, and each build's modes are set against its own
# update mode.
#   bench/ps_vs_updates.sh                      # --model=small-256 --steps=10
#   bench/ps_vs_updates.sh --model=gpt2-small --steps=5
#   MUON_PS_WORKERS="1 2" MUON_PS_ROUNDS=3 bench/ps_vs_updates.sh --model=small --steps=100
#   MUON_PS_BUILDS="build /tmp/before" MUON_PS_ROUNDS=5 bench/ps_vs_updates.sh --model=small --steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[[ ${#args[@]} -eq 0 ]] && args=(--model=small-256 --steps=10)
workers=${MUON_PS_WORKERS:-1 2 4 8}
rounds=${MUON_PS_ROUNDS:-1}
builds=${MUON_PS_BUILDS:-build}
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
echo "$(date -u +%FT%TZ) $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), ${args[*]}"
row() {  # build, label, then the load arguments of the mode
  local build=$1 label=$2
  shift 2
  local out
  out=$(MUON_BUILD=$build bench/load.sh --clients=1 --progress=false "${args[@]}" "$@" 2>&1) ||
    { echo "$out"; exit 1; }
  local rate p50 gin commit
  rate=$(sed -n 's/^throughput: \([0-9.]*\) steps\/s.*/\1/p' <<<"$out")
  p50=$(sed -n 's/^step latency: p50 \([0-9.]*\) ms.*/\1/p' <<<"$out")
  gin=$(sed -n 's/^server, p50: gradients in \([0-9.]*\) ms.*/\1/p' <<<"$out")
  commit=$(sed -n 's/.*, committed \([0-9.]*\) ms after the header/\1/p' <<<"$out")
  echo "| $build | $label | $rate | $p50 ms | $gin ms | $commit ms |"
  echo "$round|$build|$label|$rate|$p50|$gin|$commit" >>"$rows"
}
echo "| build | mode | steps/s | step p50 | gradients in (p50) | committed (p50) |"
echo "| --- | --- | --- | --- | --- | --- |"
for round in $(seq "$rounds"); do
  for b in $builds; do row "$b" updates; done
  for w in $workers; do
    for b in $builds; do row "$b" "parameter server, W = $w" --parameter_server --workers="$w"; done
  done
done
echo "(load average after: $(cut -d' ' -f1-3 /proc/loadavg))"
if ((rounds > 1)); then
  echo
  echo "Medians over $rounds rounds:"
  echo "| build | mode | steps/s | of update mode | step p50 | gradients in (p50) | committed (p50) |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  awk -F'|' '
    function median(s,   a, n, t, i, j) {
      n = split(s, a, " ")
      for (i = 1; i <= n; ++i) for (j = i + 1; j <= n; ++j) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { key = $2 "|" $3
      if (!(key in rate)) order[++k] = key
      rate[key] = rate[key] " " $4; p50[key] = p50[key] " " $5; gin[key] = gin[key] " " $6; com[key] = com[key] " " $7
      at[$1 "|" key] = $4 }
    END { for (i = 1; i <= k; ++i) { m = order[i]; split(m, f, "|"); ratios = ""
        for (r = 1; (r "|" m) in at; ++r) ratios = ratios " " at[r "|" m] / at[r "|" f[1] "|updates"]
        printf "| %s | %s | %.3f | %.2f | %.1f ms | %.1f ms | %.1f ms |\n", f[1], f[2], median(rate[m]), median(ratios), median(p50[m]), median(gin[m]), median(com[m]) } }' "$rows"
fi

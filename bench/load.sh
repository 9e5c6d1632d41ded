#!/usr/bin/env bash
# Load test of one muon-server on loopback: starts the server, samples its
# resident set size every 0.5 s, runs `muonctl load` with the arguments given
# (default: --clients=16 --steps=200), and prints the load report and the RSS
# samples. Extra server flags go in MUON_LOAD_SERVER_FLAGS.
#   bench/load.sh
#   bench/load.sh --clients=4 --workers=8 --model=gpt2-small --steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MUON_BUILD:-build}
args=("$@")
[[ ${#args[@]} -eq 0 ]] && args=(--clients=16 --steps=200)
dir=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
# shellcheck disable=SC2086
"$build/bin/muon-server" --listen=127.0.0.1:0 --port_file="$dir/port" --metrics_listen= \
  ${MUON_LOAD_SERVER_FLAGS:-} 2>"$dir/server.log" &
server=$!
for _ in $(seq 200); do [[ -s "$dir/port" ]] && break; sleep 0.05; done
[[ -s "$dir/port" ]] || { cat "$dir/server.log"; exit 1; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$server/status"; }
echo "server RSS before load: $(rss) kB"
( while kill -0 "$server" 2>/dev/null; do echo "$(date +%s.%N) $(rss)"; sleep 0.5; done ) \
  >"$dir/rss" &
sampler=$!
load_status=0
"$build/bin/muonctl" load --server="127.0.0.1:$(cat "$dir/port")" "${args[@]}" || load_status=$?
kill "$sampler"
if ! kill -0 "$server" 2>/dev/null; then
  wait "$server" && server_status=0 || server_status=$?
  echo "muon-server exited during the load (status $server_status); its log:"
  cat "$dir/server.log"
  exit 1
fi
echo "server RSS after load: $(rss) kB"
echo "RSS samples (kB), every 0.5 s:"
awk '{print $2}' "$dir/rss" | paste -sd' '
exit "$load_status"

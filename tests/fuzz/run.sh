#!/usr/bin/env bash
# Builds the Step read-path fuzz target (StepReader and StepMachine) with clang (libFuzzer, ASan, UBSan)
# and runs it over the seed corpus for a bounded time; fails on any crash,
# sanitizer report or broken invariant.
#
#   tests/fuzz/run.sh BUILD_DIR [SECONDS] [extra libFuzzer flags...]
#
# BUILD_DIR is the CMake build tree (for the generated muon/v1/optimizer.pb.cc).
# The main build uses g++, so the target is compiled here, into
# BUILD_DIR/fuzz; objects are rebuilt only when a source is newer.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
build=$(cd "${1:?usage: run.sh BUILD_DIR [SECONDS] [libFuzzer flags]}" && pwd)
seconds=${2:-25}
shift $(($# < 2 ? $# : 2))

cxx=${MUON_FUZZ_CXX:-clang++}
if ! command -v "$cxx" >/dev/null; then
  echo "run.sh: $cxx not found; install clang and libclang-rt-14-dev (scripts/setup does)" >&2
  exit 1
fi
if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
    "$cxx" -x c++ -fsanitize=fuzzer - -o /dev/null 2>/dev/null; then
  echo "run.sh: $cxx cannot link libFuzzer (-fsanitize=fuzzer); install libclang-rt-14-dev" >&2
  exit 1
fi

gen=$build/proto/gen
[[ -f $gen/muon/v1/optimizer.pb.cc ]] || {
  echo "run.sh: $gen/muon/v1/optimizer.pb.cc missing; build the project first" >&2
  exit 1
}
out=$build/fuzz
mkdir -p "$out"
flags=(-std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I"$src/server/src" -I"$src/kernels/include" -I"$gen")
warn=(-Wall -Wextra -Werror)
objects=()
compile() {  # source, extra flags...
  local source=$1 obj
  shift
  obj=$out/$(basename "${source%.*}").o
  if [[ ! -f $obj || $source -nt $obj || $here/run.sh -nt $obj ]] ||
     [[ $source == *.cc && -n $(find "$src/server/src" "$src/kernels/include" -newer "$obj" -name '*.h' | head -1) ]]; then
    echo "run.sh: compiling $(basename "$source")"
    "$cxx" "${flags[@]}" "$@" -c "$source" -o "$obj"
  fi
  objects+=("$obj")
}
compile "$gen/muon/v1/optimizer.pb.cc"
for f in tests/fuzz/step_reader_fuzz.cc server/src/step/step_machine.cc server/src/step/step_reader.cc \
         server/src/step/step_assembler.cc server/src/util/buffer_shelf.cc \
         server/src/wire/convert.cc kernels/src/types.cc; do
  compile "$src/$f" "${warn[@]}"
done
# shellcheck disable=SC2046
"$cxx" "${flags[@]}" "${objects[@]}" -o "$out/step_reader_fuzz" \
  $(pkg-config --libs protobuf absl_statusor absl_status absl_strings absl_str_format \
      absl_flat_hash_set absl_raw_hash_set absl_hash absl_time absl_synchronization)

# Fresh inputs go to a scratch corpus; the committed seeds stay untouched.
work=$out/corpus
mkdir -p "$work"
echo "run.sh: fuzzing for ${seconds}s"
"$out/step_reader_fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$out/" -print_final_stats=1 "$@" "$work" "$here/corpus"

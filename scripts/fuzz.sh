#!/usr/bin/env bash
# The libFuzzer targets of fuzz/ (docs/fuzzing.md): one per input parser, built with clang under
# ASan+UBSan in their own folder, build-fuzz/ (only the sources the parsers need).
#
#   bash scripts/fuzz.sh build                      configure and build build-fuzz/
#   bash scripts/fuzz.sh run SECONDS [TARGET...]    build, then fuzz each target SECONDS in turn
#   bash scripts/fuzz.sh ci                         build, fuzz every target 30 s, two at a time
#   bash scripts/fuzz.sh list                       the target names
#
# Each target starts from its checked-in seeds (fuzz/corpus/TARGET, read only) and grows a working
# corpus in build-fuzz/corpus/TARGET that later runs continue from. A crash, sanitizer report,
# leak, input running over 10 s, or allocation over 2 GiB is a finding: the reproducer is written
# to build-fuzz/findings/ and the script exits non-zero naming it. Replay one with
#   build-fuzz/fuzz_TARGET build-fuzz/findings/TARGET-crash-...
# Environment: FUZZ_JOBS (targets at once, default 1 for run, 2 for ci), FUZZ_NICE (nice level,
# default 0; long runs beside other work: FUZZ_NICE=19).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=$root/build-fuzz
targets=(safetensors_header safetensors_index config_json llama2c_header tokenizer_json
  tokenizer_spm topology hardware_json gguf)

build() {
  bash scripts/install-clang.sh
  CC=clang CXX=clang++ cmake -S fuzz -B "$out" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$out" -j "$(nproc)"
}

# Fuzzes one target for $2 seconds; prints one summary line; returns non-zero on a finding.
fuzz_one() {
  local t=$1 secs=$2
  local bin=$out/fuzz_$t corpus=$out/corpus/$t log=$out/logs/$t.log
  mkdir -p "$corpus" "$out/findings" "$out/logs"
  local args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048
    -print_final_stats=1 -artifact_prefix="$out/findings/$t-")
  [ -f "fuzz/dict/$t.dict" ] && args+=(-dict="fuzz/dict/$t.dict")
  local rc=0
  # Leaks are findings too (libFuzzer checks after each input that allocated more than it freed).
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    nice -n "${FUZZ_NICE:-0}" "$bin" "${args[@]}" "$corpus" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  local execs rate files bytes
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  files=$(find "$corpus" -type f | wc -l)
  bytes=$(du -sb "$corpus" | cut -f1)
  printf '%-20s %4ss  %10s execs  %7s exec/s  corpus %5s files %9s bytes  %s\n' "$t" "$secs" \
    "${execs:-?}" "${rate:-?}" "$files" "$bytes" "$([ $rc -eq 0 ] && echo ok || echo FINDING)"
  if [ $rc -ne 0 ]; then
    echo "fuzz: $t: finding (exit $rc); log $log"
    grep -E "^(==[0-9]+==ERROR|SUMMARY|.*runtime error|.*Test unit written to)" "$log" | head -5 ||
      tail -20 "$log"
    return 1
  fi
}

run_all() {
  local secs=$1 jobs=$2
  shift 2
  local list=("$@")
  [ ${#list[@]} -gt 0 ] || list=("${targets[@]}")
  export -f fuzz_one
  export out root FUZZ_NICE
  local rc=0
  printf '%s\n' "${list[@]}" | xargs -P "$jobs" -I{} bash -c 'fuzz_one "$1" "$2"' _ {} "$secs" ||
    rc=$?
  if [ $rc -ne 0 ] || ls "$out"/findings/* >/dev/null 2>&1; then
    echo "fuzz: FAILED; reproducers:"
    ls -1 "$out"/findings/* 2>/dev/null || true
    return 1
  fi
  echo "fuzz: no findings"
}

# Old reproducers are not this run's findings: kept aside in findings.previous/.
clear_findings() {
  if [ -d "$out/findings" ]; then
    rm -rf "$out/findings.previous"
    mv "$out/findings" "$out/findings.previous"
  fi
}

case "${1:-}" in
  build) build ;;
  run)
    [ $# -ge 2 ] || { echo "usage: $0 run SECONDS [TARGET...]"; exit 2; }
    secs=$2
    shift 2
    build
    clear_findings
    run_all "$secs" "${FUZZ_JOBS:-1}" "$@"
    ;;
  ci)
    build
    clear_findings
    run_all "${FUZZ_SECONDS:-30}" "${FUZZ_JOBS:-2}"
    ;;
  list) printf '%s\n' "${targets[@]}" ;;
  *)
    echo "usage: $0 build | run SECONDS [TARGET...] | ci | list"
    exit 2
    ;;
esac
